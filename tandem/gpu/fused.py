"""Fused RMSNorm and RoPE on the GPU (Triton): one launch each instead of the ~7 (norm) and ~15 (rope) small
kernels of the torch reference (tandem.models.layers), which dominate a decode step's GPU time between the CPU
experts. Same arithmetic as the reference, step by step, in fp32 (products and sums rounded one by one: no FMA
contraction), so results match it to the last bit but for the order of the norm's sum and the rsqrt.

Both allocate their output with torch.empty and never read a value on the host: they run inside CUDA-graph
capture. Rows may be strided (MLA's latent and rope slices); the last dim must be contiguous (else copied).
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch

MAX_NORM_DIM = 16384  # one row per tile in registers; wider rows take the torch reference

try:  # Triton where a GPU runs it; the CPU path (tests, CPU-only installs) needs only torch
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:
    triton = None

# TANDEM_FUSED=0 keeps the torch reference on the GPU too (A/B measurements); read once, at import
ENABLED = triton is not None and os.environ.get("TANDEM_FUSED", "1") != "0"
# the interpreter (TRITON_INTERPRET=1, CPU tensors) has no libdevice: it takes numpy's cos/sin there
_PRECISE_TRIG = os.environ.get("TRITON_INTERPRET", "0") != "1"

if triton is not None:

    @triton.jit
    def _rope_cos_sin(freqs, scale, PRECISE: tl.constexpr):
        """cos and sin of the angles, times the rope's scale: libdevice's cosf / sinf (PRECISE), as torch's CUDA
        kernels (tl.cos may take the approximate unit), else tl's (the interpreter has no libdevice)."""
        if PRECISE:
            cos, sin = libdevice.cos(freqs) * scale, libdevice.sin(freqs) * scale
        else:
            cos, sin = tl.cos(freqs) * scale, tl.sin(freqs) * scale
        return cos, sin

    @triton.jit
    def _rope_pairs(j, HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
        """The indices rotated together: pairs (x[2j], x[2j+1]) (INTERLEAVED) or halves (x[j], x[j + HALF])."""
        if INTERLEAVED:
            i1, i2 = 2 * j, 2 * j + 1
        else:
            i1, i2 = j, j + HALF
        return i1, i2

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, R, D, stride_x, inv_d, eps, BLOCK_R: tl.constexpr,
                         BLOCK_D: tl.constexpr):
        """BLOCK_R rows of x [R, D] (row stride stride_x) -> out [R, D] contiguous."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_D)
        mask = (rows[:, None] < R) & (cols[None, :] < D)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=mask, other=0.0)
        xf = x.to(tl.float32)
        inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=1) * inv_d + eps)  # [BLOCK_R]; torch's mean: sum times 1/D
        y = (xf * inv_rms[:, None]).to(x.dtype).to(tl.float32)  # the reference rounds to x's dtype first
        w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
        out = out_ptr + rows[:, None].to(tl.int64) * D + cols[None, :]
        tl.store(out, (y * w[None, :]).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _add_norm_kernel(h_ptr, p_ptr, a_ptr, b_ptr, w_ptr, hout_ptr, out_ptr, R, D, inv_d, eps,
                         P_HOST: tl.constexpr, HAS_A: tl.constexpr, HAS_B: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_D: tl.constexpr):
        """BLOCK_R rows: s = h + ((p [+ a]) [+ b]) with each sum rounded to h's dtype (the reference's adds, in its
        order) -> hout; RMSNorm(s) * w as _rms_norm_kernel -> out. p may live in mapped host memory (P_HOST)."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_D)
        mask = (rows[:, None] < R) & (cols[None, :] < D)
        at = rows[:, None].to(tl.int64) * D + cols[None, :]
        ty = hout_ptr.dtype.element_ty
        if P_HOST:  # the CPU experts' output, written by the CPU just before: read past the caches
            y = tl.load(p_ptr + at, mask=mask, other=0.0, cache_modifier=".cv").to(ty)
        else:
            y = tl.load(p_ptr + at, mask=mask, other=0.0).to(ty)
        if HAS_A:
            y = (y.to(tl.float32) + tl.load(a_ptr + at, mask=mask, other=0.0).to(tl.float32)).to(ty)
        if HAS_B:
            y = (y.to(tl.float32) + tl.load(b_ptr + at, mask=mask, other=0.0).to(tl.float32)).to(ty)
        s = (tl.load(h_ptr + at, mask=mask, other=0.0).to(tl.float32) + y.to(tl.float32)).to(ty)
        tl.store(hout_ptr + at, s, mask=mask)
        sf = s.to(tl.float32)
        inv_rms = tl.rsqrt(tl.sum(sf * sf, axis=1) * inv_d + eps)
        yn = (sf * inv_rms[:, None]).to(ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
        tl.store(out_ptr + at, (yn * w[None, :]).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(x_ptr, pos_ptr, inv_ptr, out_ptr, R, H, stride_n, stride_h, scale, HALF: tl.constexpr,
                     INTERLEAVED: tl.constexpr, PRECISE: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_J: tl.constexpr):
        """BLOCK_R rows (token n, head h) of x [N, H, 2 HALF] rotated by the angles of positions[n]."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        j = tl.arange(0, BLOCK_J)
        valid_r = rows < R
        mask = valid_r[:, None] & (j[None, :] < HALF)
        n, h = rows // H, rows % H
        pos = tl.load(pos_ptr + n, mask=valid_r, other=0)
        freqs = pos.to(tl.float32)[:, None] * tl.load(inv_ptr + j, mask=j < HALF, other=0.0)[None, :]
        cos, sin = _rope_cos_sin(freqs, scale, PRECISE)
        i1, i2 = _rope_pairs(j, HALF, INTERLEAVED)
        src = x_ptr + (n.to(tl.int64) * stride_n + h.to(tl.int64) * stride_h)[:, None]
        x1 = tl.load(src + i1[None, :], mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + i2[None, :], mask=mask, other=0.0).to(tl.float32)
        dst = out_ptr + rows[:, None].to(tl.int64) * (2 * HALF)
        ty = out_ptr.dtype.element_ty
        tl.store(dst + i1[None, :], (x1 * cos - x2 * sin).to(ty), mask=mask)
        tl.store(dst + i2[None, :], (x2 * cos + x1 * sin).to(ty), mask=mask)


    @triton.jit
    def _norm_rope_rows(x_ptr, w_ptr, out_ptr, pos_ptr, inv_ptr, slots_ptr, p, R, H, stride_n, stride_h, inv_d,
                        eps, scale, HALF: tl.constexpr, NORM: tl.constexpr, INTERLEAVED: tl.constexpr,
                        PRECISE: tl.constexpr, SLOTS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr):
        """Block p of rows (token n, head h) of x [N, H, 2 HALF]: RMSNorm over the head (NORM), then RoPE; written
        to out [N, H, 2 HALF], or (SLOTS) to the cache rows [S, H, 2 HALF] at slot slots[n]."""
        rows = p * BLOCK_R + tl.arange(0, BLOCK_R)
        j = tl.arange(0, BLOCK_J)
        valid_r = rows < R
        mask = valid_r[:, None] & (j[None, :] < HALF)
        n, h = rows // H, rows % H
        i1, i2 = _rope_pairs(j, HALF, INTERLEAVED)
        src = x_ptr + (n.to(tl.int64) * stride_n + h.to(tl.int64) * stride_h)[:, None]
        x1 = tl.load(src + i1[None, :], mask=mask, other=0.0)
        x2 = tl.load(src + i2[None, :], mask=mask, other=0.0)
        ty = out_ptr.dtype.element_ty
        y1, y2 = x1.to(tl.float32), x2.to(tl.float32)
        if NORM:  # as _rms_norm_kernel: rounded to x's dtype, times the weight, rounded to the output's
            inv_rms = tl.rsqrt((tl.sum(y1 * y1, axis=1) + tl.sum(y2 * y2, axis=1)) * inv_d + eps)
            w1 = tl.load(w_ptr + i1, mask=j < HALF, other=0.0).to(tl.float32)
            w2 = tl.load(w_ptr + i2, mask=j < HALF, other=0.0).to(tl.float32)
            y1 = ((y1 * inv_rms[:, None]).to(x1.dtype).to(tl.float32) * w1[None, :]).to(ty).to(tl.float32)
            y2 = ((y2 * inv_rms[:, None]).to(x1.dtype).to(tl.float32) * w2[None, :]).to(ty).to(tl.float32)
        pos = tl.load(pos_ptr + n, mask=valid_r, other=0)
        freqs = pos.to(tl.float32)[:, None] * tl.load(inv_ptr + j, mask=j < HALF, other=0.0)[None, :]
        cos, sin = _rope_cos_sin(freqs, scale, PRECISE)
        orow = rows.to(tl.int64)
        if SLOTS:
            orow = tl.load(slots_ptr + n, mask=valid_r, other=0).to(tl.int64) * H + h
        dst = out_ptr + orow[:, None] * (2 * HALF)
        tl.store(dst + i1[None, :], (y1 * cos - y2 * sin).to(ty), mask=mask)
        tl.store(dst + i2[None, :], (y2 * cos + y1 * sin).to(ty), mask=mask)

    @triton.jit
    def _copy_rows_to_slots(x_ptr, out_ptr, slots_ptr, p, R, H, stride_n, stride_h, D, BLOCK_R: tl.constexpr,
                            BLOCK_J: tl.constexpr):
        """Block p of rows (token n, head h) of x [N, H, D] into the cache rows [S, H, D] at slot slots[n]."""
        rows = p * BLOCK_R + tl.arange(0, BLOCK_R)
        j = tl.arange(0, BLOCK_J)
        valid_r = rows < R
        mask = valid_r[:, None] & (j[None, :] < D)
        n, h = rows // H, rows % H
        x = tl.load(x_ptr + (n.to(tl.int64) * stride_n + h.to(tl.int64) * stride_h)[:, None] + j[None, :], mask=mask)
        orow = tl.load(slots_ptr + n, mask=valid_r, other=0).to(tl.int64) * H + h
        tl.store(out_ptr + orow[:, None] * D + j[None, :], x.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _qk_norm_rope_kernel(q_ptr, k_ptr, v_ptr, wq_ptr, wk_ptr, oq_ptr, ok_ptr, ov_ptr, pos_ptr, inv_ptr,
                             slots_ptr, RQ, RK, HQ, HK, sqn, sqh, skn, skh, svn, svh, PQ, PK, inv_d, eps, scale,
                             HALF: tl.constexpr, NORM: tl.constexpr, INTERLEAVED: tl.constexpr,
                             PRECISE: tl.constexpr, CACHE: tl.constexpr, BLOCK_R: tl.constexpr,
                             BLOCK_J: tl.constexpr):
        """Programs [0, PQ) take q's rows, [PQ, PQ + PK) k's: both heads' norm and rotation in one launch. CACHE:
        k's rows go to the cache rows ok [S, HK, d] at their slots, and the programs after k's copy v's there (ov)."""
        p = tl.program_id(0)
        if p < PQ:
            _norm_rope_rows(q_ptr, wq_ptr, oq_ptr, pos_ptr, inv_ptr, slots_ptr, p, RQ, HQ, sqn, sqh, inv_d, eps,
                            scale, HALF, NORM, INTERLEAVED, PRECISE, False, BLOCK_R, BLOCK_J)
        elif p < PQ + PK:
            _norm_rope_rows(k_ptr, wk_ptr, ok_ptr, pos_ptr, inv_ptr, slots_ptr, p - PQ, RK, HK, skn, skh, inv_d, eps,
                            scale, HALF, NORM, INTERLEAVED, PRECISE, CACHE, BLOCK_R, BLOCK_J)
        else:
            _copy_rows_to_slots(v_ptr, ov_ptr, slots_ptr, p - PQ - PK, RK, HK, svn, svh, 2 * HALF, BLOCK_R,
                                2 * BLOCK_J)


def _tile(rows: int, block_cols: int) -> tuple[int, int]:
    """(rows per program, warps): up to 4096 values per program (short rows, the q/k heads, share one), ~32 per
    thread; a wider row is one program of up to 16 warps."""
    block_r = min(triton.next_power_of_2(max(rows, 1)), max(1, 4096 // block_cols))
    return block_r, min(16, max(4, block_r * block_cols // 1024))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype) over the last dim, one launch.

    The result has torch's promoted dtype of weight and x (bf16 weight: x's dtype; fp32 weight: fp32)."""
    d = x.shape[-1]
    if weight.shape != (d,):
        raise ValueError(f"rms_norm: weight of shape {tuple(weight.shape)} for rows of {d}")
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rows = x.reshape(-1, d)  # a view wherever the rows have one stride (MLA's latent slice too)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    if rows.shape[0] == 0:
        return out
    block_d = max(16, triton.next_power_of_2(d))
    block_r, warps = _tile(rows.shape[0], block_d)
    grid = (triton.cdiv(rows.shape[0], block_r),)
    with torch.cuda.device(x.device) if x.is_cuda else nullcontext():  # Triton launches on the current device
        _rms_norm_kernel[grid](rows, weight, out, rows.shape[0], d, rows.stride(0), 1.0 / d, eps,
                               BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps, enable_fp_fusion=False)
    return out


def add_rms_norm(h: torch.Tensor, p: torch.Tensor, weight: torch.Tensor, eps: float, *adds: torch.Tensor | None,
                 p_host: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(s, weight, eps), s) with s = h + ((p [+ adds[0]]) [+ adds[1]]) in h's dtype, each sum rounded as
    torch's adds are: a decoder layer's residual add and the next norm in one launch. h, p and adds are [N, D] rows
    (p of any float dtype, read as h's; `p_host`: p is pinned host memory the CPU experts just wrote)."""
    d = h.shape[-1]
    adds = tuple(t for t in adds if t is not None)
    if len(adds) > 2 or weight.shape != (d,) or h.dim() != 2 or p.shape != h.shape or any(
            t.shape != h.shape for t in adds):
        raise ValueError(f"add_rms_norm: h {tuple(h.shape)}, p {tuple(p.shape)}, adds "
                         f"{[tuple(t.shape) for t in adds]} (at most 2), weight {tuple(weight.shape)}")
    h, p = h.contiguous(), p.contiguous()
    a, b = (*(t.contiguous() for t in adds), None, None)[:2]
    s = torch.empty_like(h)
    out = torch.empty(h.shape, dtype=torch.promote_types(h.dtype, weight.dtype), device=h.device)
    if h.shape[0] == 0:
        return out, s
    block_d = max(16, triton.next_power_of_2(d))
    block_r, warps = _tile(h.shape[0], block_d)
    grid = (triton.cdiv(h.shape[0], block_r),)
    with torch.cuda.device(h.device) if h.is_cuda else nullcontext():
        _add_norm_kernel[grid](h, p, a if a is not None else h, b if b is not None else h, weight, s, out, h.shape[0],
                               d, 1.0 / d, eps, P_HOST=bool(p_host), HAS_A=a is not None, HAS_B=b is not None,
                               BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps, enable_fp_fusion=False)
    return out, s


def rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scale: float,
         interleaved: bool) -> torch.Tensor:
    """x [N, H, d] rotated by the angles positions[n] * inv_freq (cos, sin times scale) -> contiguous, x's dtype.

    As tandem.models.layers.rotate: pairs (x[2j], x[2j+1]) if interleaved, else halves; fp32 math."""
    if x.dim() != 3 or x.shape[-1] != 2 * inv_freq.numel() or positions.shape != x.shape[:1]:
        raise ValueError(f"rope: x {tuple(x.shape)} must be [N, H, {2 * inv_freq.numel()}] with positions [N], "
                         f"got positions {tuple(positions.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    n, h, d = x.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if n * h == 0:
        return out
    block_j = max(8, triton.next_power_of_2(d // 2))
    # ~512 values per program: decode's few rows spread over SMs (one program of 64 heads took 11 us for MLA's q)
    block_r, warps = min(triton.next_power_of_2(n * h), max(1, 256 // block_j)), 4
    grid = (triton.cdiv(n * h, block_r),)
    with torch.cuda.device(x.device) if x.is_cuda else nullcontext():
        _rope_kernel[grid](x, positions, inv_freq.float().contiguous(), out, n * h, h, x.stride(0), x.stride(1),
                           float(scale), HALF=d // 2, INTERLEAVED=bool(interleaved), PRECISE=_PRECISE_TRIG,
                           BLOCK_R=block_r, BLOCK_J=block_j, num_warps=warps, enable_fp_fusion=False)
    return out


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, wq: torch.Tensor | None, wk: torch.Tensor | None, eps: float,
                 positions: torch.Tensor, inv_freq: torch.Tensor, scale: float, interleaved: bool,
                 cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """rope(rms_norm(q, wq)), rope(rms_norm(k, wk)) in one launch (no norm when wq is None): q [N, H, d], k [N, Hk,
    d], rows possibly strided (views of one q/k/v projection) -> contiguous tensors; the results of rms_norm then
    rope, step by step.

    cache = (v [N, Hk, d], k_cache [S, Hk, d], v_cache [S, Hk, d], slots [N]): k's result and v go straight into the
    cache rows at `slots` (what paged_attention.write_kv does, in the same launch); returns (q's result, None)."""
    d = q.shape[-1]
    if q.dim() != 3 or k.dim() != 3 or k.shape[-1] != d or d != 2 * inv_freq.numel() or q.shape[0] != k.shape[0]:
        raise ValueError(f"qk_norm_rope: q {tuple(q.shape)} and k {tuple(k.shape)} must be [N, heads, "
                         f"{2 * inv_freq.numel()}]")
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    norm = wq is not None
    ty = torch.promote_types(q.dtype, wq.dtype) if norm else q.dtype
    oq = torch.empty(q.shape, dtype=ty, device=q.device)
    n, hq, hk = q.shape[0], q.shape[1], k.shape[1]
    if cache is not None:
        v, ok, ov, slots = cache
        if v.shape != k.shape or ok.shape[1:] != k.shape[1:] or ov.shape[1:] != k.shape[1:] or slots.shape != (n,):
            raise ValueError(f"qk_norm_rope: cache of k {tuple(ok.shape)}, v {tuple(ov.shape)}, v rows "
                             f"{tuple(v.shape)}, slots {tuple(slots.shape)} for k {tuple(k.shape)}")
        if not (ok.is_contiguous() and ov.is_contiguous()):
            raise ValueError("qk_norm_rope: the cache storages must be contiguous")
        v = v if v.stride(-1) == 1 else v.contiguous()
    else:
        ok = torch.empty(k.shape, dtype=ty, device=k.device)
        v, ov, slots = k, ok, positions  # unused
    if n == 0:
        return oq, None if cache is not None else ok
    block_j = max(8, triton.next_power_of_2(d // 2))
    # ~512 values per program (the norm and rotation keep ~10 fp32 copies of a tile: larger ones spill)
    block_r, warps = min(triton.next_power_of_2(n * max(hq, hk)), max(1, 256 // block_j)), 4
    pq, pk = triton.cdiv(n * hq, block_r), triton.cdiv(n * hk, block_r)
    grid = (pq + pk * (2 if cache is not None else 1),)
    with torch.cuda.device(q.device) if q.is_cuda else nullcontext():
        _qk_norm_rope_kernel[grid](q, k, v, wq if norm else q, wk if norm else k, oq, ok, ov, positions,
                                   inv_freq.float().contiguous(), slots, n * hq, n * hk, hq, hk, q.stride(0),
                                   q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), pq, pk, 1.0 / d,
                                   eps, float(scale), HALF=d // 2, NORM=norm, INTERLEAVED=bool(interleaved),
                                   PRECISE=_PRECISE_TRIG, CACHE=cache is not None, BLOCK_R=block_r,
                                   BLOCK_J=block_j, num_warps=warps, enable_fp_fusion=False)
    return oq, None if cache is not None else ok
