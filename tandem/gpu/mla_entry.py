"""MLA's entry at decode on the GPU: the two projections of x as one matmul, then one Triton launch for the norms,
k_pe's RoPE and the write of the new latent-cache rows (models/deepseek.py, MLAttention).

    joined       q_a_proj ‖ kv_a_proj_with_mqa (q_proj ‖ kv_a_proj_with_mqa without a q bottleneck): their weights
                 concatenated once, on an eager call, the projections keeping views of it (tandem.gpu.joined)
                                                                          one GEMM (GEMV at one row) instead of two
    entry        q_a_layernorm of the q part -> a new tensor (q_b_proj's input); kv_a_layernorm of the latent and
                 RoPE of k_pe -> straight into the paged cache rows latent ‖ k_pe at the step's slots
                                                                          one launch instead of ~6 (two norms, a
                                                                          RoPE, a cat, the index_copy_)

Arithmetic as tandem.gpu.fused: fp32 step by step (products and sums rounded one by one: no FMA contraction), the
roundings of the torch reference (the norm rounds to x's dtype before the weight, the RoPE to x's dtype), so the
results match it but for the norm's sum order and the last bits of rsqrt. Allocates with torch.empty only and
never reads a value on the host: CUDA-graph safe. TANDEM_MLA_FUSED=0 keeps the module's own path (read once, at
import).
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch

from tandem.gpu.fused import _PRECISE_TRIG, triton  # triton: None where it is not installed

if triton is not None:  # Triton where a GPU runs it; without it the module's own path runs
    import triton.language as tl

    from tandem.gpu.fused import _rope_cos_sin, _rope_pairs

ENABLED = triton is not None and os.environ.get("TANDEM_MLA_FUSED", "1") != "0"

# ------------------------------------------------------------------------------- norms, RoPE, the cache write

if triton is not None:

    @triton.jit
    def _normed_row(x, w_ptr, cols, mask, inv_d, eps):
        """RMSNorm of one row x (x's dtype) times the weight, fp32: the row normalized and rounded to x's dtype
        first (as RMSNorm and fused._rms_norm_kernel); the caller rounds the product."""
        xf = x.to(tl.float32)
        inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=0) * inv_d + eps)  # torch's mean: the sum times 1/D
        y = (xf * inv_rms).to(x.dtype).to(tl.float32)
        return y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _latent_rope_to_cache(kv_ptr, w_ptr, cache_ptr, pos_ptr, inv_ptr, slots_ptr, n, stride_kv, stride_c, R,
                              inv_r, eps, scale, HALF: tl.constexpr, LAT_X: tl.constexpr,
                              INTERLEAVED: tl.constexpr, PRECISE: tl.constexpr, BLOCK_R: tl.constexpr,
                              BLOCK_J: tl.constexpr):
        """Token n's row latent [R] ‖ k_pe [2 HALF] of kv: the latent normed, k_pe rotated, both written to the
        cache row slots[n]."""
        src = kv_ptr + n.to(tl.int64) * stride_kv
        dst = cache_ptr + tl.load(slots_ptr + n).to(tl.int64) * stride_c
        ty = cache_ptr.dtype.element_ty
        cols = tl.arange(0, BLOCK_R)
        mask = cols < R
        x = tl.load(src + cols, mask=mask, other=0.0)
        lat = _normed_row(x, w_ptr, cols, mask, inv_r, eps)
        if LAT_X:  # the norm's result has x's dtype (a weight of x's dtype): rounded there, then to the cache's
            lat = lat.to(x.dtype)
        tl.store(dst + cols, lat.to(ty), mask=mask)
        j = tl.arange(0, BLOCK_J)
        mj = j < HALF
        freqs = tl.load(pos_ptr + n).to(tl.float32) * tl.load(inv_ptr + j, mask=mj, other=0.0)
        cos, sin = _rope_cos_sin(freqs, scale, PRECISE)
        i1, i2 = _rope_pairs(j, HALF, INTERLEAVED)
        x1 = tl.load(src + R + i1, mask=mj, other=0.0)
        x2 = tl.load(src + R + i2, mask=mj, other=0.0)
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        tl.store(dst + R + i1, (f1 * cos - f2 * sin).to(x1.dtype).to(ty), mask=mj)
        tl.store(dst + R + i2, (f2 * cos + f1 * sin).to(x1.dtype).to(ty), mask=mj)

    @triton.jit
    def _entry_kernel(q_ptr, kv_ptr, wq_ptr, wkv_ptr, oq_ptr, cache_ptr, pos_ptr, inv_ptr, slots_ptr, stride_q,
                      stride_kv, stride_c, DQ, R, inv_dq, inv_r, eps_q, eps_kv, scale, NQ: tl.constexpr,
                      HALF: tl.constexpr, LAT_X: tl.constexpr, INTERLEAVED: tl.constexpr, PRECISE: tl.constexpr,
                      BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr):
        """Program (n, 0) normalizes token n's q row into oq (NQ = 1); program (n, NQ) its latent-cache row."""
        n = tl.program_id(0)
        if tl.program_id(1) < NQ:
            cols = tl.arange(0, BLOCK_Q)
            mask = cols < DQ
            x = tl.load(q_ptr + n.to(tl.int64) * stride_q + cols, mask=mask, other=0.0)
            y = _normed_row(x, wq_ptr, cols, mask, inv_dq, eps_q)
            tl.store(oq_ptr + n.to(tl.int64) * DQ + cols, y.to(oq_ptr.dtype.element_ty), mask=mask)
        else:
            _latent_rope_to_cache(kv_ptr, wkv_ptr, cache_ptr, pos_ptr, inv_ptr, slots_ptr, n, stride_kv, stride_c,
                                  R, inv_r, eps_kv, scale, HALF, LAT_X, INTERLEAVED, PRECISE, BLOCK_R, BLOCK_J)


def cache_dtype(kv: torch.Tensor, wkv: torch.Tensor) -> torch.dtype:
    """The dtype of the cache rows latent ‖ k_pe as the module's own path makes them (norm's promoted dtype)."""
    return torch.promote_types(kv.dtype, wkv.dtype)


def _check(q: torch.Tensor | None, kv: torch.Tensor, wq: torch.Tensor | None, wkv: torch.Tensor,
           positions: torch.Tensor, half: int, cache: torch.Tensor, slots: torch.Tensor) -> None:
    n, r = kv.shape[0], wkv.numel()
    bad = kv.dim() != 2 or kv.shape[1] != r + 2 * half or cache.dim() != 2 or cache.shape[1] != r + 2 * half
    bad = bad or positions.shape != (n,) or slots.shape != (n,) or wkv.shape != (r,)
    bad = bad or (q is not None and (q.dim() != 2 or q.shape[0] != n or wq is None or wq.shape != q.shape[1:]))
    if bad:
        raise ValueError(f"mla_entry: q {None if q is None else tuple(q.shape)}, kv {tuple(kv.shape)}, weights "
                         f"{None if wq is None else tuple(wq.shape)} / {tuple(wkv.shape)}, positions "
                         f"{tuple(positions.shape)}, slots {tuple(slots.shape)}, cache {tuple(cache.shape)}: need "
                         f"q [N, Dq], kv and cache rows of r + {2 * half}, weights [Dq] / [r], positions and slots [N]")
    if cache.stride(1) != 1:
        raise ValueError("mla_entry: the cache rows must be contiguous")


def norm_rope_to_cache(q: torch.Tensor | None, kv: torch.Tensor, wq: torch.Tensor | None, wkv: torch.Tensor,
                       eps_q: float, eps_kv: float, positions: torch.Tensor, inv_freq: torch.Tensor, scale: float,
                       interleaved: bool, cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor | None:
    """One launch: rms_norm(q, wq) returned (contiguous, the promoted dtype of q and wq; None without q), and
    cache[slots[n]] = rms_norm(latent, wkv) ‖ rope(k_pe) for kv's rows [N, r + rope] = latent ‖ k_pe (RoPE as
    tandem.models.layers.RotaryEmbedding: angles positions[n] * inv_freq, cos / sin times scale, pairs if
    interleaved else halves). Rows may be strided views of one projection; each result rounds as the torch
    reference (RMSNorm, then RotaryEmbedding, then the cat and index_copy_ into the cache's dtype)."""
    half = inv_freq.numel()
    _check(q, kv, wq, wkv, positions, half, cache, slots)
    q = q if q is None or q.stride(-1) == 1 else q.contiguous()
    kv = kv if kv.stride(-1) == 1 else kv.contiguous()
    n, r = kv.shape[0], wkv.numel()
    dq = q.shape[1] if q is not None else 0
    oq = None if q is None else torch.empty(q.shape, dtype=torch.promote_types(q.dtype, wq.dtype), device=q.device)
    if n == 0:
        return oq
    nq = int(q is not None)
    block_q, block_r = triton.next_power_of_2(max(dq, 16)), triton.next_power_of_2(max(r, 16))
    warps = min(16, max(4, max(block_q, block_r) // 512))  # ~16 values per thread (DeepSeek-V3's q row: 1536)
    with torch.cuda.device(kv.device) if kv.is_cuda else nullcontext():  # Triton launches on the current device
        _entry_kernel[(n, nq + 1)](
            q if q is not None else kv, kv, wq if q is not None else wkv, wkv, oq if q is not None else cache, cache,
            positions, inv_freq.float().contiguous(), slots, q.stride(0) if q is not None else 0, kv.stride(0),
            cache.stride(0), dq, r, 1.0 / max(dq, 1), 1.0 / r, eps_q, eps_kv, float(scale), NQ=nq, HALF=half,
            LAT_X=cache_dtype(kv, wkv) == kv.dtype, INTERLEAVED=bool(interleaved), PRECISE=_PRECISE_TRIG,
            BLOCK_Q=block_q, BLOCK_R=block_r, BLOCK_J=max(8, triton.next_power_of_2(half)), num_warps=warps,
            enable_fp_fusion=False)
    return oq
