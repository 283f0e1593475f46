"""Attention over a flattened batch of sequences: grouped-query (Llama, Qwen, Mixtral) and the KV-cache contract.

Tokens of all sequences in a step are concatenated ([N, ...]); `Batch` says how many belong to each sequence
and how many that sequence already has in the cache. Each attention layer hands its new per-token tensors to
`batch.cache.store(...)` and gets back the sequence's whole history, whatever layout the cache uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from tandem.models.layers import RMSNorm, RotaryEmbedding


class CacheView(Protocol):
    def store(self, layer: int, seq: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Append `new` ([T, ...] each) to sequence `seq` at layer `layer`; return its full history ([L, ...])."""
        ...


@dataclass
class Batch:
    """Which sequences the N flattened tokens belong to, and where their history lives."""

    qlens: list[int]  # new tokens of each sequence, in order; sum = N
    starts: list[int]  # tokens each sequence already holds in the cache
    cache: CacheView | None = None  # None: no history kept (starts must be 0)

    @staticmethod
    def single(n: int) -> Batch:
        return Batch([n], [0])

    def store(self, layer: int, seq: int, *new: torch.Tensor) -> tuple[Any, ...]:
        if self.cache is None:
            return new
        return self.cache.store(layer, seq, *new)

    def positions(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.cat([torch.arange(s, s + q) for s, q in zip(self.starts, self.qlens)]).to(device)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """Causal attention of T new queries at positions start.. over L = start + T keys.

    q [T, H, d], k [L, Hkv, d], v [L, Hkv, dv] -> [T, H, dv]; Hkv divides H (grouped-query).
    """
    t, length = q.shape[0], k.shape[0]
    q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    gqa = k.shape[0] != q.shape[0]
    if start == 0 and t == length:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        keys = torch.arange(length, device=q.device)
        mask = keys[None, :] <= torch.arange(start, start + t, device=q.device)[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.transpose(0, 1)


class Attention(nn.Module):
    """Grouped-query attention with RoPE; optional q/k/v bias (Qwen2) and per-head q/k RMSNorm (Qwen3)."""

    def __init__(
        self,
        layer_idx: int,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        rope: RotaryEmbedding,
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm_eps: float | None = None,
    ):
        super().__init__()
        self.layer_idx, self.n_heads, self.n_kv_heads, self.head_dim = layer_idx, n_heads, n_kv_heads, head_dim
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=o_bias)
        if qk_norm_eps is not None:
            self.q_norm = RMSNorm(head_dim, qk_norm_eps)
            self.k_norm = RMSNorm(head_dim, qk_norm_eps)
        self.rotary_emb = rope
        self.scale = head_dim**-0.5

    def forward(self, x: torch.Tensor, positions: torch.Tensor, batch: Batch) -> torch.Tensor:
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.n_heads, self.head_dim)  # [N, H, d]
        k = self.k_proj(x).view(n, self.n_kv_heads, self.head_dim)  # [N, Hkv, d]
        v = self.v_proj(x).view(n, self.n_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(q, positions), self.rotary_emb(k, positions)
        outs = []
        for i, (qi, ki, vi) in enumerate(zip(*(t.split(batch.qlens) for t in (q, k, v)))):
            k_all, v_all = batch.store(self.layer_idx, i, ki, vi)
            outs.append(attend(qi, k_all, v_all, batch.starts[i], self.scale))
        return self.o_proj(torch.cat(outs).reshape(n, -1))
