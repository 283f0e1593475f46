"""Attention over a flattened batch of sequences: grouped-query (Llama, Qwen, Mixtral) and the KV-cache contract.

Tokens of all sequences in a step are concatenated ([N, ...]); `Batch` says how many belong to each sequence
and how many that sequence already has in the cache. Two ways to reach the history:

- reference (`batch.paged is None`): per sequence, `batch.cache.store(...)` appends the new per-token tensors
  and returns that sequence's whole history; a Python loop over sequences (the CPU reference);
- paged (`batch.paged` a `PagedMeta`, built once per step by the engine): every layer writes its new tokens
  to its flat slot storage (`batch.cache.buffers`) through `slot_mapping` and attends over the block tables of
  the whole batch in a few tensor ops: no host sync, no loop over sequences, static shapes in decode (CUDA
  graphs capture it).

Legend: N new tokens (all sequences), B sequences, Q longest new-token run, L keys per sequence (W blocks *
block size), H query heads, Hkv key/value heads, d head dim, S cache slots.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from tandem.models.layers import RMSNorm, RotaryEmbedding


class CacheView(Protocol):
    def store(self, layer: int, seq: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Append `new` ([T, ...] each) to sequence `seq` at layer `layer`; return its full history ([L, ...])."""
        ...

    def buffers(self, layer: int, *like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The flat slot storage ([S, ...] each, shaped, typed and placed like `like`) of layer `layer`."""
        ...


@dataclass
class PagedMeta:
    """One step's batch over a paged cache, as tensors (built on the CPU once, copied once per device)."""

    slot_mapping: torch.Tensor  # [N] int64: cache slot (block * block_size + offset) of each new token
    positions: torch.Tensor  # [N] int64
    token_index: torch.Tensor  # [N] int64: row of each new token in the padded [B * Q] query layout
    block_tables: torch.Tensor  # [B, W] int64: block ids of each sequence, padded with any valid block
    context_lens: torch.Tensor  # [B] int64: tokens in the cache after this step (start + qlen)
    qlens: torch.Tensor  # [B] int64
    max_qlen: int  # Q
    block_size: int
    fresh: bool  # no sequence has history: attention needs only this step's keys
    _copies: dict[torch.device, PagedMeta] = field(default_factory=dict, repr=False)
    _derived: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)

    TENSORS = ("slot_mapping", "positions", "token_index", "block_tables", "context_lens", "qlens")

    @property
    def decode(self) -> bool:
        """Every sequence brings exactly one token: queries are [B] and the padded layout is the identity."""
        return self.max_qlen == 1

    @property
    def width(self) -> int:
        """L: keys gathered per sequence."""
        return self.block_tables.shape[1] * self.block_size

    def derived(self, key: tuple, make) -> torch.Tensor:
        """`make()`, computed once per step and shared by every layer (gather indices, masks).

        Whoever captures a CUDA graph over layers must `forget()` first, so the graph recomputes them.
        """
        if key not in self._derived:
            self._derived[key] = make()
        return self._derived[key]

    def forget(self) -> None:
        self._derived.clear()

    def to(self, device: torch.device | str) -> PagedMeta:
        """This metadata on `device` (itself if already there; copies made once and kept)."""
        device = torch.device(device)
        here = self.slot_mapping.device
        if here == device or (device.type == here.type and device.index is None):
            return self
        if device not in self._copies:
            moved = {n: getattr(self, n).to(device) for n in self.TENSORS}
            self._copies[device] = PagedMeta(**moved, max_qlen=self.max_qlen, block_size=self.block_size,
                                             fresh=self.fresh)
        return self._copies[device]

    @staticmethod
    def build(tables: list[list[int]], starts: list[int], qlens: list[int], block_size: int,
              width_blocks: int | None = None, pad_block: int = 0) -> PagedMeta:
        """Metadata for sequences with block tables `tables`, `starts` cached tokens and `qlens` new ones.

        width_blocks: columns of block_tables (default: the longest table); missing entries are `pad_block`.
        """
        b, q = len(qlens), max(qlens)
        w = width_blocks if width_blocks is not None else max(len(t) for t in tables)
        seq = torch.repeat_interleave(torch.arange(b), torch.tensor(qlens))  # [N]
        starts_t, qlens_t = torch.tensor(starts), torch.tensor(qlens)
        first = torch.cumsum(qlens_t, 0) - qlens_t  # [B] index of each sequence's first new token
        offset = torch.arange(len(seq)) - first[seq]  # [N] index within the sequence's new tokens
        positions = starts_t[seq] + offset
        block_tables = torch.full((b, w), pad_block, dtype=torch.long)
        for i, t in enumerate(tables):
            block_tables[i, : len(t)] = torch.tensor(t[:w], dtype=torch.long)
        slots = block_tables[seq, positions // block_size] * block_size + positions % block_size
        return PagedMeta(slots, positions, seq * q + offset, block_tables, starts_t + qlens_t, qlens_t, q,
                         block_size, fresh=not any(starts))


@dataclass
class Batch:
    """Which sequences the N flattened tokens belong to, and where their history lives."""

    qlens: list[int]  # new tokens of each sequence, in order; sum = N
    starts: list[int]  # tokens each sequence already holds in the cache
    cache: CacheView | None = None  # None: no history kept (starts must be 0)
    paged: PagedMeta | None = None  # set: attend over the paged cache as a batch (see module docstring)

    @staticmethod
    def single(n: int) -> Batch:
        return Batch([n], [0])

    def store(self, layer: int, seq: int, *new: torch.Tensor) -> tuple[Any, ...]:
        if self.cache is None:
            return new
        return self.cache.store(layer, seq, *new)

    def positions(self, device: torch.device | str = "cpu") -> torch.Tensor:
        if self.paged is not None:
            return self.paged.positions.to(device)
        return torch.cat([torch.arange(s, s + q) for s, q in zip(self.starts, self.qlens)]).to(device)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """Causal attention of T new queries at positions start.. over L = start + T keys.

    q [T, H, d], k [L, Hkv, d], v [L, Hkv, dv] -> [T, H, dv]; Hkv divides H (grouped-query).
    """
    t, length = q.shape[0], k.shape[0]
    q, k, v = (x.transpose(0, 1)[None] for x in (q, k, v))  # [1, H, T, d]: the fused SDPA kernels take 4-D only
    gqa = k.shape[1] != q.shape[1]
    if start == 0 and t == length:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        keys = torch.arange(length, device=q.device)
        mask = keys[None, :] <= torch.arange(start, start + t, device=q.device)[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out[0].transpose(0, 1)


# ---------------------------------------------------------------- paged: the whole batch in tensor ops


def pad_queries(x: torch.Tensor, meta: PagedMeta) -> torch.Tensor:
    """[N, ...] -> [B, Q, ...]: each sequence's new tokens in its own row, zeros after them."""
    b = meta.qlens.shape[0]
    if meta.decode:
        return x.view(b, 1, *x.shape[1:])
    out = x.new_zeros((b * meta.max_qlen, *x.shape[1:]))
    return out.index_copy_(0, meta.token_index, x).view(b, meta.max_qlen, *x.shape[1:])


def unpad_queries(x: torch.Tensor, meta: PagedMeta) -> torch.Tensor:
    """[B, Q, ...] -> [N, ...], the inverse of pad_queries."""
    flat = x.reshape(-1, *x.shape[2:])
    return flat if meta.decode else flat.index_select(0, meta.token_index)


def gather_pages(buf: torch.Tensor, meta: PagedMeta) -> torch.Tensor:
    """Slot storage [S, ...] -> every sequence's keys [B, L, ...] in position order (beyond its length: junk)."""
    bs = meta.block_size

    def slots() -> torch.Tensor:
        return (meta.block_tables[:, :, None] * bs + torch.arange(bs, device=buf.device)).flatten(1)  # [B, L]

    return buf[meta.derived(("slots", buf.device), slots)]


def paged_mask(meta: PagedMeta, length: int, repeat: int = 1) -> torch.Tensor:
    """[B, 1, Q * repeat, L] bool: key j is visible to new token i of sequence b (causal, inside the sequence);
    each query row repeated `repeat` times (grouped-query heads folded into rows)."""

    def make() -> torch.Tensor:
        dev = meta.qlens.device
        keys = torch.arange(length, device=dev)
        qpos = (meta.context_lens - meta.qlens)[:, None] + torch.arange(meta.max_qlen, device=dev)  # [B, Q]
        # rows past a sequence's new tokens see its whole history, never nothing (no NaN), and are dropped
        mask = ((keys <= qpos[:, :, None]) & (keys < meta.context_lens[:, None, None]))[:, None]
        return mask.repeat_interleave(repeat, dim=2) if repeat > 1 else mask

    return meta.derived(("mask", length, repeat), make)


def sdpa_paged(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: PagedMeta, scale: float,
               causal_fresh: bool) -> torch.Tensor:
    """q [B, Q, H, d], k [B, L, Hkv, d], v [B, L, Hkv, dv] -> [B, Q, H, dv].

    causal_fresh: k/v are this step's tokens only (no history), so a plain causal mask is exact (flash kernel).
    """
    b, nq, h, d = q.shape
    hkv = k.shape[2]
    k, v = k.transpose(1, 2), v.transpose(1, 2)
    if causal_fresh:
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=True, scale=scale,
                                             enable_gqa=hkv != h)
        return out.transpose(1, 2)
    # the G query heads sharing a kv head become G query rows of it (head h = kv * G + g, as Hugging Face's
    # repeat_kv): equal head counts let the fused kernels take the mask instead of expanding K/V G times
    g = h // hkv
    qf = q.view(b, nq, hkv, g, d).permute(0, 2, 1, 3, 4).reshape(b, hkv, nq * g, d)
    mask = paged_mask(meta, k.shape[2], g)  # [B, 1, Q * G, L]
    out = F.scaled_dot_product_attention(qf, k, v, attn_mask=mask, scale=scale)  # [B, Hkv, Q * G, dv]
    return out.view(b, hkv, nq, g, -1).permute(0, 2, 1, 3, 4).reshape(b, nq, h, -1)


def write_pages(bufs: tuple[torch.Tensor, ...], new: tuple[torch.Tensor, ...], meta: PagedMeta) -> None:
    for buf, t in zip(bufs, new):
        buf.index_copy_(0, meta.slot_mapping, t.to(buf.dtype))


def attend_paged(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: Batch, layer: int,
                 scale: float) -> torch.Tensor:
    """Grouped-query attention of the whole batch over the paged cache; q [N, H, d], k/v [N, Hkv, d] -> [N, H, d]."""
    meta = batch.paged.to(q.device)
    bufs = batch.cache.buffers(layer, k, v)
    write_pages(bufs, (k, v), meta)
    qp = pad_queries(q, meta)
    if meta.fresh and not meta.decode:
        out = sdpa_paged(qp, pad_queries(k, meta), pad_queries(v, meta), meta, scale, causal_fresh=True)
    else:
        kc, vc = (gather_pages(b, meta).to(q.dtype) for b in bufs)
        out = sdpa_paged(qp, kc, vc, meta, scale, causal_fresh=False)
    return unpad_queries(out, meta)


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
        return self.o_proj(self.attend_batch(q, k, v, batch).reshape(n, -1))

    def attend_batch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: Batch) -> torch.Tensor:
        """q [N, H, d], k/v [N, Hkv, d] of every sequence -> [N, H, d]; operators may replace it by a kernel."""
        if batch.paged is not None:
            return attend_paged(q, k, v, batch, self.layer_idx, self.scale)
        outs = []
        for i, (qi, ki, vi) in enumerate(zip(*(t.split(batch.qlens) for t in (q, k, v)))):
            k_all, v_all = batch.store(self.layer_idx, i, ki, vi)
            outs.append(attend(qi, k_all, v_all, batch.starts[i], self.scale))
        return torch.cat(outs)
