"""Attention operators: MLA (DeepSeek) and grouped-query attention, on the module's own torch forward.

The module keeps its projections (each placed by its own rule, e.g. as `linear` ops) and its KV-cache contract;
the operator runs it on its device. An absorbed-MLA decode kernel plugs in here with [E].
"""

from __future__ import annotations

from torch import nn

from tandem.ops.base import DeviceOp, LoadContext, OpConfig, load_own_tensors, swap_class


class AttentionOp(DeviceOp):
    pass


def build(module: nn.Module, cfg: OpConfig, ctx: LoadContext) -> nn.Module:
    load_own_tensors(module, cfg.name, cfg.generate_device, ctx)
    return swap_class(module, AttentionOp, cfg, ctx)
