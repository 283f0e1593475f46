"""A few rows times a weight on the GPU (Triton): y = x Wᵀ for x [M, K] with M <= MAX_M, the decode step's linears.

At batch 1 a linear reads its whole weight for one row of x, so it runs at the rate the weight streams from HBM;
the tensor-core quant matmul (quant_matmul: 16-row tiles, the weight's bytes loaded one by one) and cuBLAS' tiles
spend their time elsewhere. Here each program takes BLOCK_N output rows and walks K with 16-byte loads,
accumulating x[m, k] w[n, k] elementwise in fp32 and reducing once at the end (no tensor cores, no shuffles in
the loop). Weights: bf16 / fp16 / fp32 (one row of x: below cuBLAS' tiles only then), q8_0p (tandem.gpu.blocks:
a row's int8 values, then its fp16 scales; rows of K % 64 == 0 so they start on 4-byte words), or fp8_e4m3 (a
row's FP8 values, then the fp32 scales of its 128-value blocks). fp32 accumulation; one launch; CUDA-graph safe.

Legend: M rows of x, N output features, K input features, W int32 words (4 int8 values) per row per step.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tandem.gpu.blocks import QuantTensor

# rows of x it takes (H200, bench/gemv.py): q8_0p at 4 rows still beats the tensor-core quant matmul ~3x; float
# weights past one row go to the tensor-core kernels
MAX_M = {"q8_0p": 4, "fp8_e4m3": 8, "bf16": 1, "fp16": 1, "fp32": 1}
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


# word t (each byte already + 128) -> its 4 bytes, each in the mantissa of 2^23 (0x4B000000 | b): one prmt a value
_PRMT_BYTES = tl.constexpr("""{
.reg .b32 m;
mov.b32 m, 0x4B000000;
prmt.b32 $0, $4, m, 0x7650;
prmt.b32 $1, $4, m, 0x7651;
prmt.b32 $2, $4, m, 0x7652;
prmt.b32 $3, $4, m, 0x7653;
}""")


@triton.jit
def _byte_floats(t, PRMT: tl.constexpr):
    """The 4 bytes of int32 words t as exact floats 2^23 + b (one tensor per byte, lowest first)."""
    if PRMT:
        b0, b1, b2, b3 = tl.inline_asm_elementwise(_PRMT_BYTES, "=r,=r,=r,=r,r", [t], dtype=(tl.int32,) * 4,
                                                   is_pure=True, pack=1)
    else:
        b0 = (t & 0xFF) | 0x4B000000
        b1 = ((t >> 8) & 0xFF) | 0x4B000000
        b2 = ((t >> 16) & 0xFF) | 0x4B000000
        b3 = ((t >> 24) & 0xFF) | 0x4B000000
    return (b0.to(tl.float32, bitcast=True), b1.to(tl.float32, bitcast=True), b2.to(tl.float32, bitcast=True),
            b3.to(tl.float32, bitcast=True))


@triton.jit
def _gemv_q8_0p_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_x, row_bytes, stride_o,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRMT: tl.constexpr):
    """int8 -> fp32 without the GPU's int-to-float unit (16 a clock per SM against 128 FMAs): each byte, biased by
    128 (one xor per word), goes into the mantissa of 2^23 and 2^23 + 128 is subtracted (exact). A step takes
    W words of each of BLOCK_N rows as 4 byte planes, each against x at k = 4 w + j."""
    W: tl.constexpr = BLOCK_K // 4  # int32 words of values per row per step
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, W)
    valid_m, valid_n = offs_m < M, offs_n < N
    rows = offs_n.to(tl.int64) * row_bytes  # byte offset of each weight row (a multiple of 4: K % 64 == 0)
    words = w_ptr.to(tl.pointer_type(tl.int32)) + rows // 4
    scales = w_ptr.to(tl.pointer_type(tl.float16)) + (rows + K) // 2  # a row's fp16 scales follow its K values
    x_rows = x_ptr + offs_m[:, None] * stride_x
    bias = 8388736.0  # 2^23 + 128
    acc = tl.zeros((BLOCK_M, BLOCK_N, W), dtype=tl.float32)
    for w0 in range(0, K // 4, W):
        wi = w0 + offs_w
        valid_w = wi < K // 4
        t = tl.load(words[:, None] + wi[None, :], mask=valid_n[:, None] & valid_w[None, :], other=0,
                    eviction_policy="evict_first") ^ -0x7F7F7F80  # 0x80808080: each byte + 128 (mod 256)
        q0, q1, q2, q3 = _byte_floats(t, PRMT)
        xm = valid_m[:, None] & valid_w[None, :]
        x0 = tl.load(x_rows + 4 * wi[None, :], mask=xm, other=0.0).to(tl.float32)
        x1 = tl.load(x_rows + 4 * wi[None, :] + 1, mask=xm, other=0.0).to(tl.float32)
        x2 = tl.load(x_rows + 4 * wi[None, :] + 2, mask=xm, other=0.0).to(tl.float32)
        x3 = tl.load(x_rows + 4 * wi[None, :] + 3, mask=xm, other=0.0).to(tl.float32)
        dot = (x0[:, None, :] * (q0 - bias)[None] + x1[:, None, :] * (q1 - bias)[None]
               + x2[:, None, :] * (q2 - bias)[None] + x3[:, None, :] * (q3 - bias)[None])
        d = tl.load(scales[:, None] + wi[None, :] // 8, mask=valid_n[:, None] & valid_w[None, :],
                    other=0.0).to(tl.float32)  # [BN, W]: the scale of each word's group of 32
        acc += dot * d[None, :, :]
    y = tl.sum(acc, axis=2)
    tl.store(out_ptr + offs_m[:, None] * stride_o + offs_n[None, :], y.to(out_ptr.dtype.element_ty),
             mask=valid_m[:, None] & valid_n[None, :])


# 4 FP8 E4M3 bytes (one register) -> 4 fp32 registers holding value * 2^-120: sign to bit 31, exponent and mantissa
# to bits 26..20 (prmt puts the byte on top, an arithmetic shift by 4 moves it, the and clears the copied sign
# bits); a zero exponent lands on an fp32 subnormal of the same mantissa, so subnormal FP8 values stay exact
_FP8_BITS = tl.constexpr("{\n.reg .b32 z, r;\nmov.b32 z, 0;\n" + "".join(
    f"prmt.b32 r, $4, z, 0x{j}444;\nshr.s32 r, r, 4;\nand.b32 ${j}, r, 0x87FFFFFF;\n" for j in range(4)) + "}")


@triton.jit
def _fp8_values(w, INT: tl.constexpr):
    """FP8 E4M3 bytes w (uint8) as fp32: INT, by integer ops, each value times 2^-120 (the caller scales back);
    else by Triton's conversion (through fp16), the values themselves."""
    if INT:
        v = tl.inline_asm_elementwise(_FP8_BITS, "=r,=r,=r,=r,r", [w], dtype=tl.float32, is_pure=True, pack=4)
    else:
        v = w.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    return v


@triton.jit
def _gemv_fp8_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_x, row_bytes, stride_o,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr, INT: tl.constexpr):
    """2-8 rows of x (one row: _gemv_fp8_row_kernel). A step reads CHUNKS blocks of 128 values of BLOCK_N rows;
    each value, times its row's block scale, is multiplied by x and accumulated elementwise (no reduction, no
    data exchanged between threads in the loop); one reduction at the end. INT: values converted as value *
    2^-120, so x is taken times 2^60 (products of normal size down to |x w| = 2^-66, ~1e-20, below which they are
    lost: far below a bf16 activation times a weight) and the scales times 2^60."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, 128)
    valid_m, valid_n = offs_m < M, offs_n < N
    rows = offs_n.to(tl.int64) * row_bytes  # byte offset of each weight row (a multiple of 4: K % 128 == 0)
    scales = w_ptr.to(tl.pointer_type(tl.float32)) + (rows + K) // 4  # a row's fp32 block scales follow its values
    w_rows = w_ptr + rows[:, None]
    x_rows = x_ptr + offs_m[:, None] * stride_x
    half = 1.152921504606846976e18 if INT else 1.0  # 2^60
    acc = tl.zeros((BLOCK_M, BLOCK_N, 128), dtype=tl.float32)
    for k0 in range(0, K, 128 * CHUNKS):
        for c in tl.static_range(CHUNKS):
            kb = k0 + 128 * c
            k = kb + offs_k
            w = tl.load(w_rows + k[None, :], mask=valid_n[:, None] & (k < K)[None, :], other=0,
                        eviction_policy="evict_first")
            x = tl.load(x_rows + k[None, :], mask=valid_m[:, None] & (k < K)[None, :], other=0.0).to(tl.float32)
            s = tl.load(scales + kb // 128, mask=valid_n & (kb < K), other=0.0)
            acc += (x * half)[:, None, :] * (_fp8_values(w, INT) * (s * half)[:, None])[None]
    y = tl.sum(acc, axis=2)
    tl.store(out_ptr + offs_m[:, None] * stride_o + offs_n[None, :], y.to(out_ptr.dtype.element_ty),
             mask=valid_m[:, None] & valid_n[None, :])


@triton.jit
def _gemv_fp8_row_kernel(x_ptr, w_ptr, out_ptr, N, K, row_bytes,
                         BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr, INT: tl.constexpr):
    """_gemv_fp8_kernel for one row of x: a step's CHUNKS blocks of 128 as one [BLOCK_N, CHUNKS, 128] tile, so
    warps spread along K too (a few long rows still fill the GPU), and the accumulator keeps the weight's load
    layout (with x's rows as a dimension of their own, Triton moves every weight value through shared memory)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, CHUNKS)
    offs_k = tl.arange(0, 128)
    valid_n = offs_n < N
    rows = offs_n.to(tl.int64) * row_bytes
    scales = w_ptr.to(tl.pointer_type(tl.float32)) + (rows + K) // 4
    w_rows = w_ptr + rows[:, None, None]
    half = 1.152921504606846976e18 if INT else 1.0  # 2^60
    acc = tl.zeros((BLOCK_N, CHUNKS, 128), dtype=tl.float32)
    for k0 in range(0, K, 128 * CHUNKS):
        kb = k0 + 128 * offs_c  # [C]: the first value of each block
        k = kb[:, None] + offs_k[None, :]  # [C, 128]
        w = tl.load(w_rows + k[None], mask=valid_n[:, None, None] & (k < K)[None], other=0,
                    eviction_policy="evict_first")
        x = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)
        s = tl.load(scales[:, None] + (kb // 128)[None, :], mask=valid_n[:, None] & (kb < K)[None, :], other=0.0)
        acc += (x * half)[None] * (_fp8_values(w, INT) * (s * half)[:, :, None])
    tl.store(out_ptr + offs_n, tl.sum(tl.sum(acc, axis=2), axis=1).to(out_ptr.dtype.element_ty), mask=valid_n)


@dataclass(frozen=True)
class Config:
    """One launch's tiling: output rows per program, K values per step, warps."""

    block_n: int
    block_k: int
    num_warps: int
    prmt: bool = True  # q8_0p: bytes by prmt (inline PTX) rather than shifts and masks; fp8_e4m3: by integer
    # ops (inline PTX) rather than Triton's conversion; fp8_e4m3 reads block_k // 128 blocks of 128 a step


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def config_for(fmt: str, m: int, n: int, k: int, sms: int) -> Config:
    """The tiling of an [m, k] x [n, k]ᵀ product, from bench/gemv.py --sweep on an H200: q8_0p takes one row per
    program and 512 values a step for one row of x (8 rows and 1024 for more: x's rows share each weight load);
    float weights 1024 values a step and up to 8 rows per program while that leaves 8 programs per SM; fp8_e4m3
    (one row of x) Triton's conversion, 4 warps, 1024 values a step on long rows, 2-8 rows by N and K."""
    if fmt == "q8_0p":
        return Config(1, 512, 4) if m == 1 else Config(8, 1024, 4)
    if fmt == "fp8_e4m3" and m == 1:  # the sweep's best on DeepSeek-V3's five attention / shared-expert shapes
        return Config(2 if n < 4096 else 4 if k >= 16384 else 8, 1024 if k >= 4096 else 512, 4, prmt=False)
    block_n = 8
    while block_n > 1 and triton.cdiv(n, block_n) < 8 * sms:
        block_n //= 2
    return Config(block_n, 1024, 8 if triton.cdiv(n, block_n) < 4 * sms else 4)


def supports(x: torch.Tensor, w: QuantTensor) -> bool:
    """Whether gemv takes this product: few rows, a weight format it reads, x and W on one CUDA device."""
    return (x.is_cuda and x.dim() == 2 and 0 < x.shape[0] <= MAX_M.get(w.fmt, 0) and len(w.shape) == 2
            and w.device == x.device and (w.fmt != "q8_0p" or w.k % 64 == 0) and (w.fmt != "fp8_e4m3"
                                                                                  or w.k % 128 == 0))


def gemv(x: torch.Tensor, w: QuantTensor, out: torch.Tensor | None = None, config: Config | None = None
         ) -> torch.Tensor:
    """x [M, K] @ W[N, K]ᵀ -> [M, N] in x's dtype (into `out` if given); M <= MAX_M."""
    if not supports(x, w):
        raise ValueError(f"gemv: x {tuple(x.shape)} on {x.device} with a {w.fmt} weight {w.shape} on {w.device}: "
                         f"needs at most {MAX_M.get(w.fmt, 0)} rows of a {'/'.join(MAX_M)} weight (q8_0p: "
                         "K % 64 == 0, fp8_e4m3: K % 128 == 0), both on one CUDA device")
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
        elif w.fmt == "fp8_e4m3" and m == 1:
            _gemv_fp8_row_kernel[grid](x, w.data, out, n, k, w.data.stride(0), BLOCK_N=c.block_n,
                                       CHUNKS=max(1, c.block_k // 128), INT=c.prmt, num_warps=c.num_warps)
        elif w.fmt == "fp8_e4m3":
            _gemv_fp8_kernel[grid](x, w.data, out, m, n, k, x.stride(0), w.data.stride(0), out.stride(0),
                                   BLOCK_M=triton.next_power_of_2(m), BLOCK_N=c.block_n,
                                   CHUNKS=max(1, c.block_k // 128), INT=c.prmt, num_warps=c.num_warps)
        else:
            _gemv_q8_0p_kernel[grid](x, w.data, out, m, n, k, x.stride(0), w.data.stride(0), out.stride(0),
                                     BLOCK_M=triton.next_power_of_2(m), BLOCK_N=c.block_n, BLOCK_K=c.block_k,
                                     PRMT=c.prmt, num_warps=c.num_warps)
    return out
