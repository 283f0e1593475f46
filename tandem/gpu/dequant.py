"""Weight blocks (tandem.gpu.blocks) dequantized in one pass into a caller's float buffer.

A long prefill computes a streamed layer's experts with dense float GEMMs (tandem.gpu.prefill_gemm): each weight
is dequantized once per layer here instead of once per tile of the grouped GEMM. On a GPU one Triton launch reads
the blocks and writes the floats (memory bound: ~1 GB per Qwen3-30B layer, well under a millisecond of HBM); on
the CPU (tests) the torch reference dequantizer runs on bounded chunks of rows. GGUF's K-quants (q4_k, q5_k,
q6_k: tandem.gpu.blocks.KQUANT_FORMATS) have a kernel of their own, a tile of rows by one 256-value super-block.
"""

from __future__ import annotations

import torch

from tandem.gpu.blocks import FLOAT_FORMATS, KQUANT_FORMATS, QuantTensor, dequantize

CHUNK_VALUES = 1 << 24  # CPU path: rows dequantized per step, so fp32 temporaries stay ~64 MB

try:  # Triton where a GPU runs it; the CPU path (tests, CPU-only installs) needs only torch
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:
    from tandem.gpu.quant_matmul import _f16_at, _weight_tile

    @triton.jit
    def _dequant_kernel(w_ptr, out_ptr, R, K, row_stride, N, expert_stride, FMT: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_K: tl.constexpr):
        """Rows [R, K] of blocks -> out: one tile of BLOCK_R rows x BLOCK_K values per program. Row r goes to
        out + (r // N) expert_stride + (r % N) K (N rows per expert; experts may lie apart in out)."""
        offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (offs_k[:, None] < K) & (offs_r[None, :] < R)
        base = tl.zeros((), dtype=tl.int64)
        w = _weight_tile(w_ptr, base, offs_k, offs_r, mask, K, row_stride, FMT)  # [BK, BR] fp32
        r64 = offs_r[None, :].to(tl.int64)
        out = out_ptr + (r64 // N) * expert_stride + (r64 % N) * K + offs_k[:, None]
        tl.store(out, w.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _kquant_tile(w_ptr, row, v, rmask, mask, FMT: tl.constexpr):
        """Values v [1, 256] of the super-blocks at byte offsets row [R, 1] (rmask: rows in range; mask: [R, 256]) as
        tandem.weights.gguf_quants computes them: ((d sc) q) - (dmin m) for q4_k / q5_k (the subtraction may fuse into
        an fma), (d sc) (q - 32) for q6_k. FMT: KQUANT_FORMATS' codes."""
        w16 = w_ptr.to(tl.pointer_type(tl.uint16))
        if FMT == 7:  # q6_k: ql[128] | qh[64] | int8 scales[16] | d; halves of 128 in quarters of 32
            h, qd, lane = v // 128, (v % 128) // 32, v % 32
            low = (tl.load(w_ptr + row + 64 * h + 32 * (qd % 2) + lane, mask=mask, other=0).to(tl.int32)
                   >> (4 * (qd // 2))) & 0xF
            high = (tl.load(w_ptr + row + 128 + 32 * h + lane, mask=mask, other=0).to(tl.int32) >> (2 * qd)) & 3
            sc = tl.load(w_ptr + row + 192 + v // 16, mask=mask, other=0).to(tl.int8, bitcast=True)
            d = _f16_at(w16, row + 208, rmask)
            w = d * sc.to(tl.float32) * ((low | (high << 4)) - 32).to(tl.float32)
        else:  # q4_k (5) / q5_k (6): d | dmin | scales[12] (6-bit scale, min per sub-block of 32) | (qh[32]) | qs[128]
            j = v // 32
            lo = tl.load(w_ptr + row + 4 + j % 4, mask=mask, other=0).to(tl.int32)
            mid = tl.load(w_ptr + row + 8 + j % 4, mask=mask, other=0).to(tl.int32)
            hi = tl.load(w_ptr + row + 12 + j % 4, mask=mask, other=0).to(tl.int32)
            sc = tl.where(j < 4, lo & 63, (hi & 0xF) | ((lo >> 6) << 4))
            mn = tl.where(j < 4, mid & 63, (hi >> 4) | ((mid >> 6) << 4))
            if FMT == 5:
                qs = row + 16
            else:
                qs = row + 48
            q = (tl.load(w_ptr + qs + 32 * (v // 64) + v % 32, mask=mask, other=0).to(tl.int32)
                 >> (4 * (j % 2))) & 0xF
            if FMT == 6:  # fifth bit: bit j of qh[v % 32]
                q = q | (((tl.load(w_ptr + row + 16 + v % 32, mask=mask, other=0).to(tl.int32) >> j) & 1) << 4)
            d, dmin = _f16_at(w16, row, rmask), _f16_at(w16, row + 2, rmask)
            w = d * sc.to(tl.float32) * q.to(tl.float32) - dmin * mn.to(tl.float32)
        return w

    @triton.jit
    def _kquant_kernel(w_ptr, out_ptr, R, K, row_stride, N, expert_stride, FMT: tl.constexpr, NBYTES: tl.constexpr,
                       BLOCK_R: tl.constexpr):
        """Rows [R, K] of K-quant super-blocks -> out (rows placed as in _dequant_kernel): BLOCK_R rows x one
        super-block per program."""
        offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
        sb = tl.program_id(1)
        v = tl.arange(0, 256)[None, :]
        rmask = offs_r < R
        mask = rmask & (v < 256)
        row = offs_r.to(tl.int64) * row_stride + sb * NBYTES
        w = _kquant_tile(w_ptr, row, v, rmask, mask, FMT)
        r64 = offs_r.to(tl.int64)
        out = out_ptr + (r64 // N) * expert_stride + (r64 % N) * K + sb * 256 + v
        tl.store(out, w.to(out_ptr.dtype.element_ty), mask=mask)


def rows_apart(out: torch.Tensor) -> tuple[int, int] | None:
    """(rows per expert N, elements between experts) of out [*, N, K] whose rows are contiguous: any contiguous
    tensor, or [E, N, K] with experts apart (e.g. the gate half of a joined [E, 2I, K] buffer); else None."""
    if out.is_contiguous():
        return out.shape[-2], out.shape[-2] * out.shape[-1]
    if out.dim() == 3 and out.stride(2) == 1 and (out.shape[1] == 1 or out.stride(1) == out.shape[2]):
        return out.shape[1], out.stride(0)
    return None


def dequantize_into(w: QuantTensor, out: torch.Tensor) -> torch.Tensor:
    """w [*, N, K] (any format) -> out, a float tensor of w's shape on w's device whose rows are contiguous (its
    experts may lie apart: the gate or up half of a joined [E, 2I, K] buffer); returns out.

    Values are those of blocks.dequantize (fp32: q d + m), rounded once to out's dtype."""
    place = rows_apart(out) if tuple(out.shape) == tuple(w.shape) and out.dim() >= 2 else None
    if place is None or out.device != w.device:
        raise ValueError(f"dequantize_into: out must be {tuple(w.shape)} with contiguous rows on {w.device}, got "
                         f"{tuple(out.shape)} strides {tuple(out.stride())} on {out.device}")
    if w.fmt in FLOAT_FORMATS:
        return out.copy_(w.data)
    k = w.k
    rows = out.numel() // k
    data = w.data.reshape(rows, -1)
    if data.stride(-1) != 1 or data.stride(0) != data.shape[1]:
        data = data.contiguous()
    n, expert_stride = place
    on_gpu = out.device.type == "cuda" and triton is not None
    if on_gpu and w.fmt in KQUANT_FORMATS:
        block_r = 8
        grid = (triton.cdiv(rows, block_r), k // 256)
        with torch.cuda.device(out.device):
            _kquant_kernel[grid](data, out, rows, k, data.shape[1], n, expert_stride, FMT=w.code,
                                 NBYTES=KQUANT_FORMATS[w.fmt][1], BLOCK_R=block_r, num_warps=4)
        return out
    if on_gpu:
        block_r, block_k = 32, 128
        grid = (triton.cdiv(rows, block_r), triton.cdiv(k, block_k))
        with torch.cuda.device(out.device):
            _dequant_kernel[grid](data, out, rows, k, data.shape[1], n, expert_stride, FMT=w.code, BLOCK_R=block_r,
                                  BLOCK_K=block_k, num_warps=4)
        return out
    if not out.is_contiguous():  # the CPU path, experts apart: one at a time into its contiguous rows
        for e, part in enumerate(out.unbind(0)):
            dequantize_into(w[e], part)
        return out
    flat = out.view(rows, k)
    step = max(1, CHUNK_VALUES // k)
    for r in range(0, rows, step):
        part = data[r : r + step]
        flat[r : r + step].copy_(dequantize(part, w.fmt, (part.shape[0], k)))
    return out
