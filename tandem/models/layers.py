"""Layers shared by every family: norms, gated MLPs, routed experts, rotary embeddings.

Legend for shape comments: N = tokens in the batch (all sequences, flattened), D = hidden size,
I = intermediate size, E = routed experts, K = experts per token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"hidden_act={name!r} is not supported ({', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): Llama's MLP, DeepSeek's dense and shared experts, one routed expert."""

    def __init__(self, dim: int, hidden: int, act: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.ModuleList):
    """Routed experts, one module per expert so parameter names match the checkpoints (experts.7.up_proj)."""

    # checkpoint names of (gate, up, down) inside one expert; Mixtral overrides with (w1, w3, w2)
    proj_names = ("gate_proj", "up_proj", "down_proj")

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        # x [N, D], topk_ids [N, K], topk_weights [N, K] -> [N, D]
        out = torch.zeros_like(x)
        for e, idx, w in route(topk_ids, topk_weights, len(self)):
            out.index_add_(0, idx, self[e](x[idx]) * w.to(x.dtype))
        return out


def route(topk_ids: torch.Tensor, topk_weights: torch.Tensor, n_experts: int):
    """Yield (expert, token indices [n], weights [n, 1]) for every expert that received tokens."""
    flat = topk_ids.flatten()
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=n_experts).tolist()
    tokens = order // topk_ids.shape[1]
    weights = topk_weights.flatten()[order].unsqueeze(1)
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, tokens[start : start + n], weights[start : start + n]
        start += n


# ---------------------------------------------------------------- rotary position embeddings


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(p: dict, dim: int, max_positions: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the cos/sin scale for a RoPE parameter dict (see base.rope_parameters)."""
    base = float(p["rope_theta"])
    # explicit cpu: models are built under torch.device("meta"), and these values are computed, not loaded
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
    kind = p["rope_type"]
    if kind == "linear":
        return inv / float(p["factor"]), 1.0
    if kind == "llama3":
        factor, low, high = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
        old = float(p["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - low) / (high - low)
        mid = (1 - smooth) * inv / factor + smooth * inv
        out = torch.where(wavelen > old / low, inv / factor, inv)
        is_mid = (wavelen >= old / high) & (wavelen <= old / low)
        return torch.where(is_mid, mid, out), 1.0
    if kind == "yarn":
        return _yarn(p, dim, base, inv, max_positions)
    return inv, 1.0


def _yarn(p: dict, dim: int, base: float, inv: torch.Tensor, max_positions: int) -> tuple[torch.Tensor, float]:
    old = p.get("original_max_position_embeddings") or max_positions
    factor = p.get("factor") or max_positions / old
    mscale, mscale_all = p.get("mscale"), p.get("mscale_all_dim")
    scale = p.get("attention_factor")
    if scale is None:
        scale = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all) if mscale and mscale_all else (
            yarn_mscale(factor)
        )
    fast, slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(fast), correction_dim(slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the ramp would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    return (inv / factor) * (1 - extrapolate) + inv * extrapolate, float(scale)


class RotaryEmbedding(nn.Module):
    """RoPE over the last dim; `interleaved` rotates pairs (x0, x1) as DeepSeek does, else halves as Llama."""

    def __init__(self, dim: int, params: dict, max_positions: int, interleaved: bool = False):
        super().__init__()
        inv, self.scale = rope_frequencies(params, dim, max_positions)
        self.register_buffer("inv_freq", inv, persistent=False)
        self.interleaved = interleaved

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x [N, heads, d], positions [N]
        freqs = positions.float()[:, None] * self.inv_freq.to(x.device)  # [N, d/2]
        cos = (freqs.cos() * self.scale)[:, None, :]
        sin = (freqs.sin() * self.scale)[:, None, :]
        return rotate(x, cos, sin, self.interleaved)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x [N, heads, d] rotated by cos/sin [N, 1, d/2]: pairs (x0, x1) if interleaved, else halves; in float32."""
    xf = x.float()
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    else:
        x1, x2 = xf.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)
