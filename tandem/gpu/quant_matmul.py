"""Weight-only quantized matmul on the GPU (Triton): y = x Wᵀ with W in a block format (tandem.gpu.blocks), x in
bf16 / fp16 / fp32, fp32 accumulation. One kernel serves a dense linear and the grouped MoE GEMM: in the
grouped form each program takes BLOCK_M rows that all go to one expert (rows sorted by expert, see
`moe_align`) and reads that expert's weight, so a whole projection of all experts is one launch.

Legend: M rows of x, N output features, K input features, E experts, S = tokens x experts-per-token (slots).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.gpu import gemv
from tandem.gpu.blocks import BLOCK_FORMATS, ROW_FORMATS, QuantTensor
from tandem.gpu.routing import Routing, moe_align


@triton.jit
def _f16_at(w16, byte_off, mask):
    """The fp16 at an (even) byte offset, as fp32; 0 where masked (a zero scale keeps padding exactly 0)."""
    return tl.load(w16 + byte_off // 2, mask=mask, other=0).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _weight_tile(w_ptr, base, offs_k, offs_n, mask, K, row_stride, FMT: tl.constexpr):
    """W[offs_n, offs_k] transposed to [BK, BN], dequantized to fp32 (FMT: 0 float, then BLOCK_FORMATS' and
    ROW_FORMATS' codes).

    One branch per format, no early return: Triton type-checks every statement of a function."""
    if FMT == 0:
        w = tl.load(w_ptr + base + offs_n[None, :].to(tl.int64) * K + offs_k[:, None], mask=mask, other=0.0)
        w = w.to(tl.float32)
    else:
        w16 = w_ptr.to(tl.pointer_type(tl.uint16))
        row = base + offs_n[None, :].to(tl.int64) * row_stride  # [1, BN] byte offset of each row
        if FMT == 1:  # q8_0: d | int8 q[32]
            blk = row + (offs_k[:, None] // 32) * 34
            q = tl.load(w_ptr + blk + 2 + offs_k[:, None] % 32, mask=mask, other=0).to(tl.int8, bitcast=True)
            w = q.to(tl.float32) * _f16_at(w16, blk, mask)
        elif FMT == 2:  # q4_0: d | qs[16], j low nibble, j + 16 high
            blk = row + (offs_k[:, None] // 32) * 18
            j = offs_k[:, None] % 32
            q = (tl.load(w_ptr + blk + 2 + j % 16, mask=mask, other=0) >> ((j // 16) * 4)) & 0xF
            w = (q.to(tl.float32) - 8.0) * _f16_at(w16, blk, mask)
        elif FMT == 3:  # int4_g32: d[4] | m[4] | qs[64], group g in qs[16g..], j low, j + 16 high
            blk = row + (offs_k[:, None] // 128) * 80
            g = (offs_k[:, None] % 128) // 32
            j = offs_k[:, None] % 32
            q = (tl.load(w_ptr + blk + 16 + g * 16 + j % 16, mask=mask, other=0) >> ((j // 16) * 4)) & 0xF
            w = q.to(tl.float32) * _f16_at(w16, blk + 2 * g, mask) + _f16_at(w16, blk + 8 + 2 * g, mask)
        elif FMT == 4:  # int4_g128: d | m | qs[64], j low, j + 64 high
            blk = row + (offs_k[:, None] // 128) * 68
            j = offs_k[:, None] % 128
            q = (tl.load(w_ptr + blk + 4 + j % 64, mask=mask, other=0) >> ((j // 64) * 4)) & 0xF
            w = q.to(tl.float32) * _f16_at(w16, blk, mask) + _f16_at(w16, blk + 2, mask)
        elif FMT == 8:  # q8_0p: a row is int8 q[K] | fp16 d[K / 32]
            q = tl.load(w_ptr + row + offs_k[:, None], mask=mask, other=0).to(tl.int8, bitcast=True)
            w = q.to(tl.float32) * _f16_at(w16, row + K + (offs_k[:, None] // 32) * 2, mask)
        else:  # FMT == 9, fp8_e4m3: a row is fp8 e4m3 q[K] | fp32 s[K / 128]
            q = tl.load(w_ptr + row + offs_k[:, None], mask=mask, other=0).to(tl.float8e4nv, bitcast=True)
            s = tl.load(w_ptr.to(tl.pointer_type(tl.float32)) + (row + K) // 4 + offs_k[:, None] // 128, mask=mask,
                        other=0.0)
            w = q.to(tl.float32) * s
    return w


@triton.jit
def _qmm_kernel(a_ptr, w_ptr, out_ptr, slots_ptr, block_expert_ptr, scale_ptr,
                M, N, K, stride_a, stride_out, expert_stride, row_stride,
                A_DIV: tl.constexpr, FMT: tl.constexpr, ROUTED: tl.constexpr, HAS_SCALE: tl.constexpr,
                PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if ROUTED:
        expert = tl.load(block_expert_ptr + pid_m)
        if expert < 0:
            return  # padding block: no expert's rows
        slots = tl.load(slots_ptr + offs_m)
        valid_m = slots >= 0
        slots = tl.where(valid_m, slots, 0)
        rows = slots // A_DIV  # the input row of a slot: its token (A_DIV = top-k) or itself
        base = expert.to(tl.int64) * expert_stride
    else:
        valid_m = offs_m < M
        slots = tl.where(valid_m, offs_m, 0)
        rows = slots
        base = tl.zeros((), dtype=tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    valid_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        valid_k = offs_k < K
        a = tl.load(a_ptr + rows[:, None].to(tl.int64) * stride_a + offs_k[None, :],
                    mask=valid_m[:, None] & valid_k[None, :], other=0.0)
        w = _weight_tile(w_ptr, base, offs_k, offs_n, valid_k[:, None] & valid_n[None, :], K, row_stride, FMT)
        acc = tl.dot(a, w.to(a.dtype), acc, input_precision=PRECISION)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + slots, mask=valid_m, other=0.0)[:, None]
    out = out_ptr + slots[:, None].to(tl.int64) * stride_out + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=valid_m[:, None] & valid_n[None, :])


def _block_m(rows: int) -> int:
    return 16 if rows <= 16 else 32 if rows <= 32 else 64


def _launch(a: torch.Tensor, w: QuantTensor, out: torch.Tensor, m_rows: int, block_m: int, grid_m: int,
            slots=None, block_expert=None, scale=None, a_div: int = 1) -> None:
    n, k = w.n, w.k
    if a.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("quant matmul: x and out need a contiguous last dim")
    if a.shape[-1] != k:
        raise ValueError(f"quant matmul: x has {a.shape[-1]} features, the weight takes {k}")
    if w.data.device != a.device:
        raise ValueError(f"quant matmul: weight on {w.data.device}, x on {a.device}")
    routed = slots is not None
    expert_stride = w.data[0].numel() * w.data.element_size() if routed and w.code else (
        w.n * w.k if routed else 0)
    row_stride = w.data.shape[-1] if w.code else k
    block_n = 64 if n >= 64 else max(16, triton.next_power_of_2(n))
    block_k = 64 if w.code != 0 or k >= 64 else max(16, triton.next_power_of_2(k))
    dummy = out
    grid = (grid_m, triton.cdiv(n, block_n))
    with torch.cuda.device(a.device):  # Triton launches on the current device, which may be another GPU
        _qmm_kernel[grid](a, w.data, out, slots if routed else dummy, block_expert if routed else dummy,
                          scale if scale is not None else dummy, m_rows, n, k, a.stride(0), out.stride(0),
                          expert_stride, row_stride, A_DIV=a_div, FMT=w.code, ROUTED=routed,
                          HAS_SCALE=scale is not None,
                          PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
                          BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)


def quant_linear(x: torch.Tensor, w: QuantTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [*, K] @ W[N, K]ᵀ (+ bias) -> [*, N] in x's dtype."""
    lead = x.shape[:-1]
    a = x.reshape(-1, x.shape[-1])
    if a.stride(-1) != 1:
        a = a.contiguous()
    m = a.shape[0]
    if gemv.supports(a, w):  # a decode step's few rows: a weight-streaming kernel, not tensor-core tiles
        out = gemv.gemv(a, w)
    else:
        out = torch.empty(m, w.n, dtype=x.dtype, device=x.device)
        if m:
            bm = _block_m(m)
            _launch(a, w, out, m, bm, triton.cdiv(m, bm))
    if bias is not None:
        out += bias
    return out.view(*lead, w.n)


def grouped_linear(a: torch.Tensor, w: QuantTensor, routing: Routing, a_div: int,
                   scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """out[slot] = scale[slot] * a[slot // a_div] @ W[expert(slot)]ᵀ for every routed slot: [S, N].

    a [rows, K]; w stacked [E, N, K]; scale [S] float32 or None. Slots no expert took stay uninitialised."""
    if len(w.shape) != 3:
        raise ValueError(f"grouped_linear: weight must be stacked [E, N, K], got {w.shape}")
    out = torch.empty(routing.n_slots, w.n, dtype=out_dtype or a.dtype, device=a.device)
    if routing.n_slots:
        _launch(a, w, out, routing.n_slots, routing.block_m, routing.block_expert.numel(), routing.slots,
                routing.block_expert, scale, a_div)
    return out


def fused_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: QuantTensor,
                  w2: QuantTensor, act) -> torch.Tensor:
    """Routed experts on the GPU: sum_k w_k down_e(act(gate_e x) * up_e x), two grouped launches.

    x [T, D]; topk_ids / topk_weights [T, K]; w13 [E, 2I, D] (gate rows then up rows); w2 [E, D, I] -> [T, D]."""
    t, k = topk_ids.shape
    e, two_i, _ = w13.shape
    routing = moe_align(topk_ids, e, _block_m(max(1, t * k // e)))
    gate_up = grouped_linear(x.contiguous(), w13, routing, a_div=k)  # [S, 2I]
    h = act(gate_up[:, : two_i // 2]) * gate_up[:, two_i // 2 :]  # [S, I]
    weights = topk_weights.reshape(-1).float()
    y = grouped_linear(h.contiguous(), w2, routing, a_div=1, scale=weights, out_dtype=torch.float32)  # [S, D]
    valid = ((topk_ids >= 0) & (topk_ids < e)).reshape(-1, 1)
    y = torch.where(valid, y, 0.0)  # slots no expert took (masked rows) hold garbage
    return y.view(t, k, -1).sum(1).to(x.dtype)


def supported(fmt: str) -> bool:
    return fmt in BLOCK_FORMATS or fmt in ROW_FORMATS or fmt in ("bf16", "fp16", "fp32")
