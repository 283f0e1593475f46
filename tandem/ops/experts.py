"""The routed-experts operator: weights stacked per projection ([E, I, D] gate and up, [E, D, I] down) on the
generate device, a backend per phase.

Backends take the stacked float weights once (`from_weights`) and may repack or quantize them; `forward(x
[N, D], topk_ids [N, K], topk_weights [N, K]) -> [N, D]`. `TorchExperts` is the reference; `experts.cpu` is
the C++ kernel of issue [C] once it registers itself, the reference until then.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tandem.models.layers import Experts, route
from tandem.ops.base import LoadContext, OpConfig
from tandem.ops.registry import BACKENDS, resolve


class TorchExperts:
    """Reference: per expert, down(act(gate x) * up x), weighted and summed, in the model dtype."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act, device: str, **kwargs):
        self.gate, self.up, self.down, self.act, self.device = gate, up, down, act, device

    @classmethod
    def from_weights(cls, gate, up, down, act, device: str, **kwargs):
        return cls(gate, up, down, act, device, **kwargs)

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        x, topk_ids, topk_weights = x.to(self.device), topk_ids.to(self.device), topk_weights.to(self.device)
        out = torch.zeros_like(x)
        for e, idx, w in route(topk_ids, topk_weights, self.gate.shape[0]):
            g, u, d = (p[e].to(self.device) for p in (self.gate, self.up, self.down))  # a no-op when resident
            xe = x[idx]
            out.index_add_(0, idx, F.linear(self.act(F.linear(xe, g)) * F.linear(xe, u), d) * w.to(x.dtype))
        return out


class CpuExperts(TorchExperts):
    """`experts.cpu` until the C++ kernel ([C]) registers a backend under that name: the reference."""


class ExpertsOp(nn.Module):
    def __init__(self, experts: Experts, cfg: OpConfig, ctx: LoadContext):
        super().__init__()
        self.op_config, self.run_state = cfg, ctx.state
        self.num_experts = len(experts)
        names = experts.proj_names  # checkpoint names of (gate, up, down)
        first = experts[0]
        dev = cfg.generate_device
        stacked = []
        for proj in names:
            shape = tuple(getattr(first, proj).weight.shape)
            w = torch.empty((self.num_experts, *shape), dtype=ctx.dtype, device=dev)
            for e in range(self.num_experts):
                w[e] = ctx.load(f"{cfg.name}.{e}.{proj}.weight", shape, dev)
            stacked.append(w)
        self.act = first.act
        self.backends = {}
        for phase, name, device in (("generate", cfg.generate_op, dev), ("prefill", cfg.prefill_op,
                                                                          cfg.prefill_device)):
            cls = resolve(BACKENDS[name].impl)
            self.backends[phase] = cls.from_weights(*stacked, self.act, device, **cfg.kwargs)

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        # x [N, D], topk_ids [N, K], topk_weights [N, K] -> [N, D] on out_device
        y = self.backends[self.run_state.phase].forward(x, topk_ids, topk_weights)
        return y.to(self.op_config.out_device)

    def extra_repr(self) -> str:
        c = self.op_config
        return (f"{self.num_experts} experts, generate {c.generate_op}@{c.generate_device}, "
                f"prefill {c.prefill_op}@{c.prefill_device}, out {c.out_device}")


def build(module: Experts, cfg: OpConfig, ctx: LoadContext) -> nn.Module:
    return ExpertsOp(module, cfg, ctx)
