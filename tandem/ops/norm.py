"""The RMSNorm operator: the model's RMSNorm on its device (a fused kernel plugs in here)."""

from __future__ import annotations

from torch import nn

from tandem.ops.base import DeviceOp, LoadContext, OpConfig, load_own_tensors, swap_class


class NormOp(DeviceOp):
    pass


def build(module: nn.Module, cfg: OpConfig, ctx: LoadContext) -> nn.Module:
    load_own_tensors(module, cfg.name, cfg.generate_device, ctx)
    return swap_class(module, NormOp, cfg, ctx)
