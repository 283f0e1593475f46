"""A few rows times a weight on the GPU (Triton): y = x Wᵀ for x [M <= MAX_M, K], the decode step's linears.

At batch 1 a linear reads its whole weight for one row of x, so it runs at the rate the weight streams from HBM,
and cuBLAS' GEMM tiles (16+ rows, split-K with a second launch) or the tensor-core quant matmul (quant_matmul)
spend their time elsewhere. Here each program takes BLOCK_N output rows and walks K with 16-byte loads,
accumulating x[m, k] w[n, k] elementwise in fp32 and reducing once at the end (no tensor cores, no shuffles in
the loop). Weights: bf16 / fp16 / fp32, or q8_0p (tandem.gpu.blocks: a row's int8 values, then its fp16 scales;
the scale applies once per 32-value group sum). fp32 accumulation; one launch; CUDA-graph safe.

Legend: M rows of x, N output features, K input features, G groups of 32 values per step (q8_0p).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tandem.gpu.blocks import QuantTensor

MAX_M = 4  # more rows: the tensor-core kernels read the weight once for all of them anyway
FLOAT = ("bf16", "fp16", "fp32")


@triton.jit
def _gemv_float_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_x, stride_w, stride_o,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    valid_m, valid_n = offs_m < M, offs_n < N
    x_rows = x_ptr + offs_m[:, None] * stride_x
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_w
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        x = tl.load(x_rows + k[None, :], mask=valid_m[:, None] & (k < K)[None, :], other=0.0).to(tl.float32)
        w = tl.load(w_rows + k[None, :], mask=valid_n[:, None] & (k < K)[None, :], other=0.0,
                    eviction_policy="evict_first").to(tl.float32)
        acc += x[:, None, :] * w[None, :, :]
    y = tl.sum(acc, axis=2)
    tl.store(out_ptr + offs_m[:, None] * stride_o + offs_n[None, :], y.to(out_ptr.dtype.element_ty),
             mask=valid_m[:, None] & valid_n[None, :])


@triton.jit
def _gemv_q8_0p_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_x, row_bytes, stride_o,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, G: tl.constexpr):
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_g = tl.arange(0, G)
    kk = offs_g[:, None] * 32 + tl.arange(0, 32)[None, :]  # [G, 32]: the step's values, group by group
    valid_m, valid_n = offs_m < M, offs_n < N
    rows = offs_n.to(tl.int64) * row_bytes  # byte offset of each weight row
    scales = w_ptr.to(tl.pointer_type(tl.float16)) + (rows + K) // 2  # a row's fp16 scales follow its K values
    n_groups = K // 32
    acc = tl.zeros((BLOCK_M, BLOCK_N, G), dtype=tl.float32)
    for g0 in range(0, n_groups, G):
        valid_g = (g0 + offs_g) < n_groups  # [G]
        k = g0 * 32 + kk
        x = tl.load(x_ptr + offs_m[:, None, None] * stride_x + k[None, :, :],
                    mask=valid_m[:, None, None] & valid_g[None, :, None], other=0.0).to(tl.float32)
        q = tl.load(w_ptr + rows[:, None, None] + k[None, :, :], mask=valid_n[:, None, None] & valid_g[None, :, None],
                    other=0, eviction_policy="evict_first").to(tl.int8, bitcast=True).to(tl.float32)
        d = tl.load(scales[:, None] + g0 + offs_g[None, :], mask=valid_n[:, None] & valid_g[None, :],
                    other=0.0).to(tl.float32)  # [BN, G]
        acc += tl.sum(x[:, None, :, :] * q[None, :, :, :], axis=3) * d[None, :, :]
    y = tl.sum(acc, axis=2)
    tl.store(out_ptr + offs_m[:, None] * stride_o + offs_n[None, :], y.to(out_ptr.dtype.element_ty),
             mask=valid_m[:, None] & valid_n[None, :])


@dataclass(frozen=True)
class Config:
    """One launch's tiling: output rows per program, K values per step (BLOCK_K, or G groups of 32), warps."""

    block_n: int
    block_k: int
    num_warps: int


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def config_for(fmt: str, m: int, n: int, k: int, sms: int) -> Config:
    """The tiling of an [m, k] x [n, k]ᵀ product: enough programs to cover every SM about four times (few rows
    each when n is small), 16-byte loads per thread, and the per-thread accumulator bounded as m grows."""
    block_m = triton.next_power_of_2(m)
    block_n = 16
    while block_n > 1 and triton.cdiv(n, block_n) < 4 * sms:
        block_n //= 2
    step = 512 if fmt in FLOAT else 256  # K values per row per step: 1 KB of bf16, 256 B of int8 (+ 16 B scales)
    while block_m * block_n * step > 8192 and step > 64:
        step //= 2
    return Config(block_n, step, 4)


def supports(x: torch.Tensor, w: QuantTensor) -> bool:
    """Whether gemv takes this product: few rows, a weight format it reads, x and W on one CUDA device."""
    return (x.is_cuda and x.dim() == 2 and 0 < x.shape[0] <= MAX_M and len(w.shape) == 2
            and w.device == x.device and (w.fmt in FLOAT or w.fmt == "q8_0p"))


def gemv(x: torch.Tensor, w: QuantTensor, out: torch.Tensor | None = None, config: Config | None = None
         ) -> torch.Tensor:
    """x [M, K] @ W[N, K]ᵀ -> [M, N] in x's dtype (into `out` if given); M <= MAX_M."""
    if not supports(x, w):
        raise ValueError(f"gemv: x {tuple(x.shape)} on {x.device} with a {w.fmt} weight {w.shape} on {w.device}: "
                         f"needs at most {MAX_M} rows, bf16/fp16/fp32/q8_0p, one CUDA device")
    m, k = x.shape
    if k != w.k:
        raise ValueError(f"gemv: x has {k} features, the weight takes {w.k}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    n = w.n
    out = torch.empty(m, n, dtype=x.dtype, device=x.device) if out is None else out
    c = config or config_for(w.fmt, m, n, k, _sm_count(x.device))
    grid = (triton.cdiv(n, c.block_n),)
    with torch.cuda.device(x.device):
        if w.fmt in FLOAT:
            _gemv_float_kernel[grid](x, w.data, out, m, n, k, x.stride(0), w.data.stride(0), out.stride(0),
                                     BLOCK_M=triton.next_power_of_2(m), BLOCK_N=c.block_n, BLOCK_K=c.block_k,
                                     num_warps=c.num_warps)
        else:
            _gemv_q8_0p_kernel[grid](x, w.data, out, m, n, k, x.stride(0), w.data.stride(0), out.stride(0),
                                     BLOCK_M=triton.next_power_of_2(m), BLOCK_N=c.block_n, G=c.block_k // 32,
                                     num_warps=c.num_warps)
    return out
