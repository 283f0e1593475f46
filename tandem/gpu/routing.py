"""Sorted token routing for the grouped MoE GEMM, in plain torch on the routing's device (no Triton, no host sync).

Legend: T tokens, K experts per token, E experts, S = T K slots (slot = token * K + k).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Routing:
    """Slots (token * K + k) sorted by expert, each expert's run padded to a multiple of block_m with -1.

    slots [P] int64, block_expert [P / block_m] int64 (-1: a block of padding). P = S + E (block_m - 1) rounded
    up: fixed by the shapes alone, so no host sync and the same sizes under a CUDA graph."""

    slots: torch.Tensor
    block_expert: torch.Tensor
    block_m: int
    n_slots: int


def moe_align(topk_ids: torch.Tensor, n_experts: int, block_m: int) -> Routing:
    """Sort the (token, k) slots by expert on the device; ids < 0 or >= E (masked rows) are dropped."""
    flat = topk_ids.reshape(-1).long()
    s = flat.numel()
    bucket = torch.where((flat >= 0) & (flat < n_experts), flat, n_experts)  # E: the drop bucket
    # scatter_add, not bincount: bincount sizes its output from the data (a host sync)
    counts = torch.zeros(n_experts + 1, dtype=torch.long, device=flat.device).scatter_add_(0, bucket,
                                                                                           torch.ones_like(bucket))
    counts[n_experts:].zero_()  # dropped slots get no room (not `counts[E] = 0`: a CPU scalar copied, a sync)
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    starts = ends - padded
    order = torch.argsort(bucket, stable=True)
    sorted_bucket = bucket[order]
    first = counts.cumsum(0) - counts  # index in `order` where each bucket begins
    rank = torch.arange(s, device=flat.device) - first[sorted_bucket]
    total = (s + n_experts * (block_m - 1) + block_m - 1) // block_m * block_m
    dest = torch.where(sorted_bucket < n_experts, starts[sorted_bucket] + rank, total)  # dropped: past the end
    slots = torch.full((total + 1,), -1, dtype=torch.long, device=flat.device)
    slots.scatter_(0, dest, order)
    block_start = torch.arange(0, total, block_m, device=flat.device)
    block_expert = torch.searchsorted(ends[:n_experts].contiguous(), block_start, right=True)
    block_expert = torch.where(block_expert < n_experts, block_expert, -1)
    return Routing(slots[:total], block_expert, block_m, s)
