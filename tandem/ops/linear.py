"""The linear operator: y = x Wᵀ + b on its device, in its backend's weight layout (torch: the checkpoint's)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tandem.ops.base import LoadContext, OpConfig
from tandem.ops.registry import BACKENDS, resolve


def torch_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, weight, bias)


class Linear(nn.Module):
    """Weights live on generate_device; a prefill on another device streams them there for the call."""

    def __init__(self, linear: nn.Linear, cfg: OpConfig, ctx: LoadContext):
        super().__init__()
        self.op_config, self.run_state = cfg, ctx.state
        self.in_features, self.out_features = linear.in_features, linear.out_features
        dev = cfg.generate_device
        self.weight = nn.Parameter(ctx.load(f"{cfg.name}.weight", tuple(linear.weight.shape), dev),
                                   requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(
            ctx.load(f"{cfg.name}.bias", tuple(linear.bias.shape), dev), requires_grad=False)
        self.kernels = {phase: resolve(BACKENDS[name].impl) for phase, name in
                        (("generate", cfg.generate_op), ("prefill", cfg.prefill_op))}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, phase = self.op_config, self.run_state.phase
        dev = c.prefill_device if phase == "prefill" else c.generate_device
        w, b = self.weight.to(dev), None if self.bias is None else self.bias.to(dev)
        return self.kernels[phase](x.to(dev), w, b).to(c.out_device)

    def extra_repr(self) -> str:
        c = self.op_config
        return f"{self.in_features} -> {self.out_features}, {c.generate_op}@{c.generate_device}"


def build(module: nn.Linear, cfg: OpConfig, ctx: LoadContext) -> nn.Module:
    return Linear(module, cfg, ctx)
