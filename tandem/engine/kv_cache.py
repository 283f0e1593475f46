"""Paged KV cache shared by many sequences: fixed-size blocks, a block table per sequence.

What a layer keeps per token is the layer's business (K and V for GQA; latent and RoPE key for MLA): storage
is allocated on the first write of each layer, with that layer's shapes, dtype and device, so each layer's cache
lives with its layer (layers on different GPUs keep their caches there). Storage holds one block more than
`num_blocks`: the sink block `num_blocks`, never handed out, where padded rows of a CUDA-graph batch write.
"""

from __future__ import annotations

from collections import deque

import torch


class CacheFull(RuntimeError):
    """No free block is left for a sequence that needs one."""


class KVCache:
    def __init__(self, num_blocks: int, block_size: int = 16):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"KV cache needs positive num_blocks and block_size, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free: deque[int] = deque(range(num_blocks))
        self.sink = num_blocks  # block id padded rows write to (see module docstring)
        self.layers: dict[int, list[torch.Tensor]] = {}  # layer -> [(num_blocks + 1) * block_size, ...] per tensor

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def can_grow(self, table: list[int], tokens: int) -> bool:
        return self.blocks_for(tokens) - len(table) <= len(self.free)

    def grow(self, table: list[int], tokens: int) -> None:
        """Extend `table` in place so it covers `tokens` tokens."""
        need = self.blocks_for(tokens) - len(table)
        if need > len(self.free):
            raise CacheFull(f"KV cache full: {need} more blocks needed, {len(self.free)} free")
        table.extend(self.free.popleft() for _ in range(max(need, 0)))

    def release(self, table: list[int]) -> None:
        self.free.extend(table)
        table.clear()

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def bind(self, tables: list[list[int]], starts: list[int], qlens: list[int]) -> BoundCache:
        return BoundCache(self, tables, starts, qlens)

    def storage(self, layer: int, new: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        st = self.layers.get(layer)
        if st is None:
            n = (self.num_blocks + 1) * self.block_size
            # zeros, not empty: gathered slots past a sequence's end are masked, but must not hold NaN bit patterns
            st = self.layers[layer] = [torch.zeros((n, *t.shape[1:]), dtype=t.dtype, device=t.device) for t in new]
        return st

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for st in self.layers.values() for t in st)


class BoundCache:
    """The cache as one step's batch sees it: `store` writes new tokens and returns each sequence's history."""

    def __init__(self, cache: KVCache, tables: list[list[int]], starts: list[int], qlens: list[int]):
        self.cache, self.tables, self.starts, self.qlens = cache, tables, starts, qlens
        self._slots: dict[tuple[int, torch.device], torch.Tensor] = {}

    def buffers(self, layer: int, *like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Layer `layer`'s flat slot storage, allocated like `like` on the first call (paged attention)."""
        return tuple(self.cache.storage(layer, like))

    def _slot_ids(self, seq: int, device: torch.device) -> torch.Tensor:
        """Flat slot index of every position 0 .. start+qlen of sequence `seq`."""
        key = (seq, device)
        if key not in self._slots:
            bs = self.cache.block_size
            table = torch.tensor(self.tables[seq], dtype=torch.long)
            ids = (table[:, None] * bs + torch.arange(bs)[None, :]).flatten()
            self._slots[key] = ids[: self.starts[seq] + self.qlens[seq]].to(device)
        return self._slots[key]

    def store(self, layer: int, seq: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        st = self.cache.storage(layer, new)
        ids = self._slot_ids(seq, st[0].device)
        start = self.starts[seq]
        out = []
        for buf, t in zip(st, new):
            buf[ids[start:]] = t.to(buf.dtype)
            out.append(buf[ids])
        return tuple(out)
