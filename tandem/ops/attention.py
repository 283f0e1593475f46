"""Attention operators: MLA (DeepSeek) and grouped-query attention, on the module's own torch forward.

The module keeps its projections (each placed by its own rule, e.g. as `linear` ops) and its KV-cache contract;
the operator runs it on its device. With a paged batch (the engine on a GPU) both attend for the whole batch
in tensor ops over the paged cache, and MLA decodes with weight absorption (models/attention.py,
models/deepseek.py); `absorb_for_prefill: true` makes MLA prefill absorbed too (less memory for long prompts,
more FLOPs per key).
"""

from __future__ import annotations

from torch import nn

from tandem.models.deepseek import MLAttention
from tandem.ops.base import DeviceOp, LoadContext, OpConfig, load_own_tensors, swap_class


class AttentionOp(DeviceOp):
    pass


def build(module: nn.Module, cfg: OpConfig, ctx: LoadContext) -> nn.Module:
    load_own_tensors(module, cfg.name, cfg.generate_device, ctx)
    if isinstance(module, MLAttention):
        absorb = cfg.kwargs.get("absorb_for_prefill", False)
        if not isinstance(absorb, bool):
            raise ValueError(f"{cfg.name}: absorb_for_prefill must be true or false, got {absorb!r}")
        module.absorb_for_prefill = absorb
    return swap_class(module, AttentionOp, cfg, ctx)
