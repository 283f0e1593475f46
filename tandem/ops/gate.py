"""The router operator (DeepSeek's MoEGate, the softmax top-k router): expert ids and weights on out_device."""

from __future__ import annotations

from torch import nn

from tandem.ops.base import DeviceOp, LoadContext, OpConfig, load_own_tensors, swap_class


class GateOp(DeviceOp):
    pass


def build(module: nn.Module, cfg: OpConfig, ctx: LoadContext) -> nn.Module:
    load_own_tensors(module, cfg.name, cfg.generate_device, ctx)
    return swap_class(module, GateOp, cfg, ctx)
