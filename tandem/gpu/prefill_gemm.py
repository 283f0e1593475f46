"""Routed experts of a long prefill as dense float GEMMs over dequantized weights.

With thousands of tokens per layer every expert gets many rows, and the grouped GEMM that dequantizes its weight
tile by tile (tandem.gpu.quant_matmul) spends its time in that dequantization. Here each streamed layer's experts
are dequantized once (tandem.gpu.dequant) into a workspace reused by every layer, and the rows, sorted by expert,
go through torch._grouped_mm (bf16, one launch per projection) or one torch.mm per expert:

    sort slots by expert -> counts (one host sync per layer: eager prefill, never graph-captured)
    for each chunk of experts that fits the workspace:
        dequantize w13 [e, 2I, D] and w2 [e, D, I]  ->  gate|up = x w13ᵀ  ->  act(gate) up  ->  y = h w2ᵀ
        (the routing weight applied to act(gate) up, before the down projection)
    each token's K rows gathered back and summed (deterministic: no atomics)

Legend: T tokens, K experts per token, E experts, I expert intermediate size, D hidden size, S sorted slots.
"""

from __future__ import annotations

import os

import torch

from tandem.gpu.blocks import QuantTensor
from tandem.gpu.dequant import dequantize_into

# Tokens per layer from which the dense path replaces the grouped quantized GEMM (0: never), with torch._grouped_mm
# (bf16, sm_90+) and with the per-expert loop. H200, one Qwen3-30B int4_g32 layer (bench/prefill_crossover.py,
# ms grouped quantized / dense grouped_mm / dense loop): 512 tokens 3.2 / 1.57 / 4.8, 2048: 5.1 / 2.1 / 4.8,
# 8192: 16.7 / 4.3 / 6.5 (bench/results/e2e-h200.md); below 512 not measured.
DENSE_TOKENS = int(os.environ.get("TANDEM_DENSE_PREFILL_TOKENS", "512"))
LOOP_TOKENS = 4096
WORKSPACE_BYTES = 2 << 30  # dequantized experts held at once: all of a Qwen3-30B layer (1.2 GB bf16)


class Workspace:
    """One float buffer, reused by every layer of a prefill (compute is stream-ordered, so one suffices)."""

    def __init__(self, limit_bytes: int = WORKSPACE_BYTES):
        self.limit = limit_bytes
        self.buf: torch.Tensor | None = None

    def get(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        b = self.buf
        if b is None or b.numel() < numel or b.dtype != dtype or b.device != device:
            self.buf = b = None  # free the old one first
            self.buf = b = torch.empty(numel, dtype=dtype, device=device)
        return b[:numel]


def grouped_mm_ok(dtype: torch.dtype, device: torch.device) -> bool:
    """torch._grouped_mm runs here: bf16, on the CPU or a CUDA device of sm_90+ (CUTLASS)."""
    if not hasattr(torch, "_grouped_mm") or dtype != torch.bfloat16:
        return False
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (9, 0)


def use_grouped_mm(a: torch.Tensor, w: torch.Tensor) -> bool:
    """torch._grouped_mm where it runs and rows are 16-byte aligned; else a loop of torch.mm."""
    return grouped_mm_ok(a.dtype, a.device) and not (w.shape[-1] % 8 or w.shape[-2] % 8)


def dense_threshold(dtype: torch.dtype, device: torch.device) -> int:
    """Tokens per layer from which dense_experts is the faster path (0: off)."""
    if DENSE_TOKENS <= 0:
        return 0
    return DENSE_TOKENS if grouped_mm_ok(dtype, device) else max(DENSE_TOKENS, LOOP_TOKENS)


def expert_mm(a: torch.Tensor, w: torch.Tensor, counts: list[int], ends: torch.Tensor, grouped: bool | None = None
              ) -> torch.Tensor:
    """Rows of `a` [S, in] sorted by expert (counts[j] rows for expert j of w [G, out, in]) -> [S, out].

    ends: cumulative counts [G] int32 on a's device (the grouped kernel's offsets)."""
    grouped = use_grouped_mm(a, w) if grouped is None else grouped
    if grouped:
        return torch._grouped_mm(a, w.transpose(1, 2), offs=ends)
    out = torch.empty(a.shape[0], w.shape[1], dtype=a.dtype, device=a.device)
    r = 0
    for j, c in enumerate(counts):
        if c:
            torch.mm(a[r : r + c], w[j].t(), out=out[r : r + c])
            r += c
    return out


def dense_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: QuantTensor,
                  w2: QuantTensor, act, workspace: Workspace, grouped: bool | None = None) -> torch.Tensor:
    """sum_k w_k down_e(act(gate_e x) * up_e x) with e = topk_ids[:, k] (ids < 0 or >= E: padding) -> [T, D].

    x [T, D] (weights dequantized to x's dtype); w13 [E, 2I, D] gate rows then up rows; w2 [E, D, I]."""
    t, k = topk_ids.shape
    e, two_i, d = w13.shape
    i = two_i // 2
    dtype, dev = x.dtype, x.device
    flat = topk_ids.reshape(-1).long()
    key = torch.where((flat >= 0) & (flat < e), flat, e)  # E: the padding bucket, sorted last
    order = torch.argsort(key, stable=True)
    count_t = torch.bincount(key, minlength=e + 1)[:e]
    counts = count_t.tolist()  # the layer's one host sync
    n = sum(counts)
    order = order[:n]
    xs = x[order // k]  # [S, D], rows sorted by expert
    ws = topk_weights.reshape(-1)[order].to(dtype)[:, None]  # [S, 1] each row's routing weight
    ys = torch.zeros(n + 1, d, dtype=dtype, device=dev)  # row n stays 0: where padding slots point
    per_expert = 3 * i * d
    chunk = max(1, min(e, workspace.limit // (per_expert * x.element_size())))
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    for e0 in range(0, e, chunk):
        e1 = min(e, e0 + chunk)
        r0, r1 = starts[e0], starts[e1]
        if r0 == r1:
            continue  # no token chose these experts: not even dequantized
        buf = workspace.get((e1 - e0) * per_expert, dtype, dev)
        g13 = dequantize_into(w13[e0:e1], buf[: (e1 - e0) * two_i * d].view(e1 - e0, two_i, d))
        g2 = dequantize_into(w2[e0:e1], buf[(e1 - e0) * two_i * d :].view(e1 - e0, d, i))
        ends = count_t[e0:e1].cumsum(0).to(torch.int32)
        gu = expert_mm(xs[r0:r1], g13, counts[e0:e1], ends, grouped)  # [r, 2I]
        h = act(gu[:, :i]) * gu[:, i:] * ws[r0:r1]  # weighted before the down projection: [r, I], not [r, D]
        ys[r0:r1] = expert_mm(h, g2, counts[e0:e1], ends, grouped)
    # each token's K rows gathered back in slot order and summed (fp32 accumulation inside the reduction; no
    # atomics, so deterministic); 3x less memory traffic than scattering fp32 rows and summing them
    row = torch.full((t * k,), n, dtype=torch.long, device=dev)
    row[order] = torch.arange(n, device=dev)
    return ys[row].view(t, k, d).sum(1)
