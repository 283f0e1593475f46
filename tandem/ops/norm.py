"""The RMSNorm operator: the model's RMSNorm on its device; on a GPU one fused Triton launch
(tandem.gpu.fused.rms_norm) instead of the reference's ~7 small kernels."""

from __future__ import annotations

import torch
from torch import nn

from tandem.gpu import fused
from tandem.models.layers import RMSNorm
from tandem.ops.base import DeviceOp, LoadContext, OpConfig, load_own_tensors, swap_class


class NormOp(DeviceOp):
    """Mixed under RMSNorm; the fused kernel on CUDA tensors, RMSNorm.forward everywhere else."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.op_config.generate_device)
        if x.is_cuda and fused.ENABLED and x.shape[-1] <= fused.MAX_NORM_DIM:
            out = fused.rms_norm(x, self.weight, self.eps)
        else:
            out = RMSNorm.forward(self, x)
        return out.to(self.op_config.out_device)


def build(module: nn.Module, cfg: OpConfig, ctx: LoadContext) -> nn.Module:
    load_own_tensors(module, cfg.name, cfg.generate_device, ctx)
    return swap_class(module, NormOp, cfg, ctx)
