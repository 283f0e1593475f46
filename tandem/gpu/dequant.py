"""Weight blocks (tandem.gpu.blocks) dequantized in one pass into a caller's float buffer.

A long prefill computes a streamed layer's experts with dense float GEMMs (tandem.gpu.prefill_gemm): each weight
is dequantized once per layer here instead of once per tile of the grouped GEMM. On a GPU one Triton launch reads
the blocks and writes the floats (memory bound: ~1 GB per Qwen3-30B layer, well under a millisecond of HBM); on
the CPU (tests) the torch reference dequantizer runs on bounded chunks of rows.
"""

from __future__ import annotations

import torch

from tandem.gpu.blocks import FLOAT_FORMATS, QuantTensor, dequantize

CHUNK_VALUES = 1 << 24  # CPU path: rows dequantized per step, so fp32 temporaries stay ~64 MB

try:  # Triton where a GPU runs it; the CPU path (tests, CPU-only installs) needs only torch
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:
    from tandem.gpu.quant_matmul import _weight_tile

    @triton.jit
    def _dequant_kernel(w_ptr, out_ptr, R, K, row_stride, FMT: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_K: tl.constexpr):
        """Rows [R, K] of blocks -> out [R, K]: one tile of BLOCK_R rows x BLOCK_K values per program."""
        offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (offs_k[:, None] < K) & (offs_r[None, :] < R)
        base = tl.zeros((), dtype=tl.int64)
        w = _weight_tile(w_ptr, base, offs_k, offs_r, mask, K, row_stride, FMT)  # [BK, BR] fp32
        out = out_ptr + offs_r[None, :].to(tl.int64) * K + offs_k[:, None]
        tl.store(out, w.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_into(w: QuantTensor, out: torch.Tensor) -> torch.Tensor:
    """w [*, N, K] (any format) -> out, a contiguous float tensor of w's shape on w's device; returns out.

    Values are those of blocks.dequantize (fp32: q d + m), rounded once to out's dtype."""
    if tuple(out.shape) != tuple(w.shape) or not out.is_contiguous() or out.device != w.device:
        raise ValueError(f"dequantize_into: out must be contiguous {tuple(w.shape)} on {w.device}, got "
                         f"{tuple(out.shape)} on {out.device}")
    if w.fmt in FLOAT_FORMATS:
        return out.copy_(w.data)
    k = w.k
    rows = out.numel() // k
    data = w.data.reshape(rows, -1)
    if data.stride(-1) != 1 or data.stride(0) != data.shape[1]:
        data = data.contiguous()
    flat = out.view(rows, k)
    if out.device.type == "cuda" and triton is not None:
        block_r, block_k = 32, 128
        grid = (triton.cdiv(rows, block_r), triton.cdiv(k, block_k))
        with torch.cuda.device(out.device):
            _dequant_kernel[grid](data, flat, rows, k, data.shape[1], FMT=w.code, BLOCK_R=block_r,
                                  BLOCK_K=block_k, num_warps=4)
        return out
    step = max(1, CHUNK_VALUES // k)
    for r in range(0, rows, step):
        part = data[r : r + step]
        flat[r : r + step].copy_(dequantize(part, w.fmt, (part.shape[0], k)))
    return out
