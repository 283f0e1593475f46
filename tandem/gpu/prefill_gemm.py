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
import torch.nn.functional as F

from tandem.gpu.blocks import QuantTensor
from tandem.gpu.dequant import dequantize_into

try:  # Triton where a GPU runs it; the CPU path (tests, CPU-only installs) needs only torch
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# Tokens per layer from which the dense path replaces the grouped quantized GEMM (0: never), with torch._grouped_mm
# (bf16, sm_90+) and with the per-expert loop. H200, one Qwen3-30B int4_g32 layer (bench/prefill_crossover.py,
# ms grouped quantized / dense grouped_mm / dense loop): 512 tokens 3.2 / 1.57 / 4.8, 2048: 5.1 / 2.1 / 4.8,
# 8192: 16.7 / 4.3 / 6.5 (bench/results/e2e-h200.md); below 512 not measured.
DENSE_TOKENS = int(os.environ.get("TANDEM_DENSE_PREFILL_TOKENS", "512"))
LOOP_TOKENS = 4096
WORKSPACE_BYTES = 2 << 30  # dequantized experts held at once: all of a Qwen3-30B layer (1.2 GB bf16)
# On a GPU, act(gate) * up * weight and the gather-and-sum of each token's K rows as one Triton kernel each (fp32
# inside, one rounding) instead of 3 + 2 torch kernels over [S, I] and [S, D]; TANDEM_PREFILL_FUSED=0: torch's.
FUSED = os.environ.get("TANDEM_PREFILL_FUSED", "1") == "1"

if triton is not None:

    @triton.jit
    def _silu_mul_kernel(gu_ptr, w_ptr, out_ptr, S, I, BLOCK_S: tl.constexpr, BLOCK_I: tl.constexpr):
        """gu [S, 2I] (gate | up), w [S] -> out [S, I] = silu(gate) * up * w, in fp32, rounded once."""
        rows = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
        cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        mask = (rows[:, None] < S) & (cols[None, :] < I)
        at = rows[:, None].to(tl.int64) * (2 * I) + cols[None, :]
        g = tl.load(gu_ptr + at, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + at + I, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rows, mask=rows < S, other=0.0).to(tl.float32)
        h = g / (1.0 + tl.exp(-g)) * u * w[:, None]
        tl.store(out_ptr + rows[:, None].to(tl.int64) * I + cols[None, :], h.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _combine_kernel(ys_ptr, row_ptr, out_ptr, T, D, K: tl.constexpr, BLOCK_T: tl.constexpr,
                        BLOCK_D: tl.constexpr):
        """out [T, D] = sum over j < K of ys[row[t K + j]] (row -1: a padding slot, nothing), fp32 sum in j order."""
        toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        tmask = toks < T
        mask = tmask[:, None] & (cols[None, :] < D)
        acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        for j in tl.static_range(K):
            r = tl.load(row_ptr + toks.to(tl.int64) * K + j, mask=tmask, other=-1)
            v = tl.load(ys_ptr + r[:, None].to(tl.int64) * D + cols[None, :], mask=mask & (r[:, None] >= 0),
                        other=0.0)
            acc += v.to(tl.float32)
        tl.store(out_ptr + toks[:, None].to(tl.int64) * D + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=mask)


def silu_mul(gu: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """gu [S, 2I] contiguous, w [S] -> silu(gu[:, :I]) * gu[:, I:] * w[:, None] [S, I] (one Triton launch)."""
    s, i = gu.shape[0], gu.shape[1] // 2
    out = torch.empty(s, i, dtype=gu.dtype, device=gu.device)
    grid = (triton.cdiv(s, 16), triton.cdiv(i, 256))
    with torch.cuda.device(gu.device):
        _silu_mul_kernel[grid](gu, w.contiguous(), out, s, i, BLOCK_S=16, BLOCK_I=256, num_warps=4)
    return out


def combine(ys: torch.Tensor, row: torch.Tensor, t: int, k: int) -> torch.Tensor:
    """ys [S, D] contiguous, row [T K] (int64, -1: none) -> [T, D], each token's K rows summed (one launch)."""
    d = ys.shape[1]
    out = torch.empty(t, d, dtype=ys.dtype, device=ys.device)
    grid = (triton.cdiv(t, 8), triton.cdiv(d, 256))
    with torch.cuda.device(ys.device):
        _combine_kernel[grid](ys, row, out, t, d, K=k, BLOCK_T=8, BLOCK_D=256, num_warps=4)
    return out


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


def dense_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                  w13: QuantTensor | tuple[QuantTensor, QuantTensor], w2: QuantTensor, act, workspace: Workspace,
                  grouped: bool | None = None) -> torch.Tensor:
    """sum_k w_k down_e(act(gate_e x) * up_e x) with e = topk_ids[:, k] (ids < 0 or >= E: padding) -> [T, D].

    x [T, D] (weights dequantized to x's dtype); w13 [E, 2I, D] gate rows then up rows, or the pair (gate
    [E, I, D], up [E, I, D]) as a layer-wise prefill uploads them; w2 [E, D, I]."""
    t, k = topk_ids.shape
    gate_up = w13 if isinstance(w13, tuple) else None
    e, i, d = gate_up[0].shape if gate_up else (w13.shape[0], w13.shape[1] // 2, w13.shape[2])
    two_i = 2 * i
    dtype, dev = x.dtype, x.device
    fused = FUSED and triton is not None and dev.type == "cuda" and act is F.silu
    flat = topk_ids.reshape(-1).long()
    key = torch.where((flat >= 0) & (flat < e), flat, e)  # E: the padding bucket, sorted last
    order = torch.argsort(key, stable=True)
    count_t = torch.bincount(key, minlength=e + 1)[:e]
    counts = count_t.tolist()  # the layer's one host sync
    n = sum(counts)
    padded = n < t * k
    order = order[:n]
    xs = x[order // k]  # [S, D], rows sorted by expert
    wsf = topk_weights.reshape(-1)[order]  # [S] each row's routing weight
    ws = wsf.to(dtype)[:, None]
    per_expert = 3 * i * d
    chunk = max(1, min(e, workspace.limit // (per_expert * x.element_size())))
    # rows of every expert's output in sorted order; the torch combine gives padding slots one more row, kept 0
    ys = None if chunk >= e and (fused or not padded) else torch.empty(n + 1, d, dtype=dtype, device=dev)
    if ys is not None:
        ys[n].zero_()
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    for e0 in range(0, e, chunk):
        e1 = min(e, e0 + chunk)
        r0, r1 = starts[e0], starts[e1]
        if r0 == r1:
            continue  # no token chose these experts: not even dequantized
        buf = workspace.get((e1 - e0) * per_expert, dtype, dev)
        g13 = buf[: (e1 - e0) * two_i * d].view(e1 - e0, two_i, d)
        if gate_up:  # each half dequantized into its rows of the joined layout
            dequantize_into(gate_up[0][e0:e1], g13[:, :i])
            dequantize_into(gate_up[1][e0:e1], g13[:, i:])
        else:
            dequantize_into(w13[e0:e1], g13)
        g2 = dequantize_into(w2[e0:e1], buf[(e1 - e0) * two_i * d :].view(e1 - e0, d, i))
        ends = count_t[e0:e1].cumsum(0).to(torch.int32)
        gu = expert_mm(xs[r0:r1], g13, counts[e0:e1], ends, grouped)  # [r, 2I]
        if fused:  # weighted before the down projection: [r, I], not [r, D]
            h = silu_mul(gu, wsf[r0:r1])
        else:
            h = act(gu[:, :i]) * gu[:, i:] * ws[r0:r1]
        y = expert_mm(h, g2, counts[e0:e1], ends, grouped)
        if ys is None:
            ys = y  # one chunk: every sorted row, as it is
        else:
            ys[r0:r1] = y
    if ys is None:  # no token routed at all
        return torch.zeros(t, d, dtype=dtype, device=dev)
    # each token's K rows gathered back in slot order and summed (fp32 accumulation; no atomics, so
    # deterministic); 3x less memory traffic than scattering fp32 rows and summing them
    none = -1 if fused else n  # where padding slots point: nothing (fused) or the zero row
    row = torch.full((t * k,), none, dtype=torch.long, device=dev) if padded else torch.empty(t * k, dtype=torch.long,
                                                                                                device=dev)
    row[order] = torch.arange(n, device=dev)
    if fused:
        return combine(ys, row, t, k)
    return ys[row].view(t, k, d).sum(1)
