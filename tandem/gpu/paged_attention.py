"""Grouped-query decode attention over the paged KV cache in Triton: one query token per sequence.

The torch path (tandem.models.attention.attend_paged) writes the new keys and values with two index_copy kernels,
gathers every sequence's keys and values into dense [B, L, Hkv, d] tensors, then runs SDPA with a mask: about a
dozen launches per layer, which at batch 1 cost more GPU time than the attention itself. Here:

    write_kv          the new k and v rows into their cache slots                    one launch
    decode_attention  per (sequence, kv head, split of the context): the G query heads of that kv head against
                      the split's keys, read through the block table, online softmax in fp32; with one split the
                      output directly, else partial sums merged by a second launch (split-K, "flash decoding")

The split count depends only on the block table's width, which is fixed for a captured graph (graphs.py buckets
it), so the launches are graph-safe. Arithmetic in fp32: q k^T on tensor cores from bf16/fp16 (products exact in the
fp32 accumulator) or as IEEE fp32 (no TF32), p v in IEEE fp32; the result differs from the reference's SDPA by
the order of its sums. TANDEM_PAGED_ATTENTION=0 keeps the torch path.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

ENABLED = triton is not None and os.environ.get("TANDEM_PAGED_ATTENTION", "1") != "0"
SPLIT_TOKENS = 256  # context tokens one program covers before the work is split across programs
MAX_SPLITS = 64
BLOCK_N = 64  # keys per inner step

if triton is not None:

    @triton.jit
    def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slots_ptr, stride_k, stride_v, KW, VW,
                         BLOCK: tl.constexpr):
        """Token n's k row [KW] and v row [VW] into cache rows slots[n]."""
        n = tl.program_id(0)
        slot = tl.load(slots_ptr + n).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        k = tl.load(k_ptr + n.to(tl.int64) * stride_k + cols, mask=cols < KW)
        tl.store(kc_ptr + slot * KW + cols, k.to(kc_ptr.dtype.element_ty), mask=cols < KW)
        v = tl.load(v_ptr + n.to(tl.int64) * stride_v + cols, mask=cols < VW)
        tl.store(vc_ptr + slot * VW + cols, v.to(vc_ptr.dtype.element_ty), mask=cols < VW)

    @triton.jit
    def _decode_kernel(q_ptr, kc_ptr, vc_ptr, tables_ptr, lens_ptr, out_ptr, m_ptr, l_ptr, stride_qb, stride_qh,
                       stride_tb, H, HKV, scale, SPLIT: tl.constexpr, SPLITS, G: tl.constexpr,
                       BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, DV: tl.constexpr,
                       BLOCK_DV: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr, FINAL: tl.constexpr,
                       FP32: tl.constexpr):
        """Program (b, kv head, split): softmax(q k^T scale) v over context tokens [split * SPLIT, +SPLIT) of b."""
        b, kvh, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        ctx = tl.load(lens_ptr + b).to(tl.int32)
        start = s * SPLIT
        end = tl.minimum(start + SPLIT, ctx)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        dv = tl.arange(0, BLOCK_DV)
        heads = kvh * G + g
        q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + d[None, :],
                    mask=(g[:, None] < G) & (d[None, :] < D), other=0.0)
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_G], tl.float32)  # noqa: E741
        acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            p = n0 + tl.arange(0, BLOCK_N)
            valid = p < end
            blk = tl.load(tables_ptr + b.to(tl.int64) * stride_tb + p // BS, mask=valid, other=0).to(tl.int64)
            slot = blk * BS + p % BS
            k = tl.load(kc_ptr + (slot * HKV + kvh)[:, None] * D + d[None, :],
                        mask=valid[:, None] & (d[None, :] < D), other=0.0).to(q.dtype)
            if FP32:  # IEEE fp32 products (no TF32)
                sc = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [BLOCK_G, BLOCK_N]
            else:  # bf16 / fp16 products are exact in the fp32 accumulator: tensor cores lose nothing
                sc = tl.dot(q, tl.trans(k)) * scale
            sc = tl.where(valid[None, :], sc, float("-inf"))
            m_new = tl.maximum(m, tl.max(sc, 1))
            alpha = tl.exp(m - m_new)
            e = tl.exp(sc - m_new[:, None])
            l = l * alpha + tl.sum(e, 1)  # noqa: E741
            v = tl.load(vc_ptr + (slot * HKV + kvh)[:, None] * DV + dv[None, :],
                        mask=valid[:, None] & (dv[None, :] < DV), other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(e, v, input_precision="ieee")
            m = m_new
        gm = g < G
        if FINAL:
            o = acc / l[:, None]
            dst = out_ptr + (b.to(tl.int64) * H + heads)[:, None] * DV + dv[None, :]
            tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=gm[:, None] & (dv[None, :] < DV))
        else:
            row = ((b.to(tl.int64) * HKV + kvh) * SPLITS + s) * BLOCK_G + g  # partials [B, HKV, S, BLOCK_G, ...]
            tl.store(out_ptr + row[:, None] * BLOCK_DV + dv[None, :], acc)
            tl.store(m_ptr + row, m)
            tl.store(l_ptr + row, l)

    @triton.jit
    def _merge_kernel(acc_ptr, m_ptr, l_ptr, out_ptr, H, HKV, SPLITS, G: tl.constexpr, BLOCK_G: tl.constexpr,
                      DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr):
        """Program (b, kv head): the splits' partial softmax sums combined into the G heads' output."""
        b, kvh = tl.program_id(0), tl.program_id(1)
        s = tl.arange(0, BLOCK_S)
        g = tl.arange(0, BLOCK_G)
        dv = tl.arange(0, BLOCK_DV)
        base = (b.to(tl.int64) * HKV + kvh) * SPLITS
        rows = (base + s)[:, None] * BLOCK_G + g[None, :]  # [BLOCK_S, BLOCK_G]
        sm = s[:, None] < SPLITS
        m = tl.load(m_ptr + rows, mask=sm, other=float("-inf"))
        l = tl.load(l_ptr + rows, mask=sm, other=0.0)  # noqa: E741
        top = tl.max(m, 0)  # [BLOCK_G]: every head has keys in split 0
        w = tl.where(m == float("-inf"), 0.0, tl.exp(m - top[None, :]))
        denom = tl.sum(w * l, 0)
        acc = tl.load(acc_ptr + rows[:, :, None] * BLOCK_DV + dv[None, None, :], mask=sm[:, :, None], other=0.0)
        o = tl.sum(acc * w[:, :, None], 0) / denom[:, None]  # [BLOCK_G, BLOCK_DV]
        heads = kvh * G + g
        dst = out_ptr + (b.to(tl.int64) * H + heads)[:, None] * DV + dv[None, :]
        tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=(g[:, None] < G) & (dv[None, :] < DV))


def _on(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slots: torch.Tensor) -> None:
    """k [N, Hkv, d], v [N, Hkv, dv] into the slot storages k_cache [S, Hkv, d], v_cache [S, Hkv, dv] at `slots`."""
    n = k.shape[0]
    k2, v2 = k.reshape(n, -1), v.reshape(n, -1)
    k2 = k2 if k2.stride(-1) == 1 else k2.contiguous()
    v2 = v2 if v2.stride(-1) == 1 else v2.contiguous()
    if n == 0:
        return
    kw, vw = k2.shape[1], v2.shape[1]
    with _on(k.device):
        _write_kv_kernel[(n,)](k2, v2, k_cache, v_cache, slots, k2.stride(0), v2.stride(0), kw, vw,
                               BLOCK=triton.next_power_of_2(max(kw, vw)), num_warps=4)


def splits_for(width_tokens: int) -> tuple[int, int]:
    """(splits, tokens per split) for a block table `width_tokens` wide: SPLIT_TOKENS each, at most MAX_SPLITS."""
    splits = min(MAX_SPLITS, max(1, -(-width_tokens // SPLIT_TOKENS)))
    per = -(-width_tokens // splits)
    return splits, -(-per // BLOCK_N) * BLOCK_N


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """q [B, H, d] (one token per sequence, already in the cache) -> [B, H, dv]: attention over each sequence's
    context_lens[b] cached tokens, found through block_tables [B, W]."""
    b, h, d = q.shape
    hkv, dv = k_cache.shape[1], v_cache.shape[2]
    if h % hkv:
        raise ValueError(f"decode_attention: {h} query heads are not a multiple of {hkv} kv heads")
    g = h // hkv
    if q.stride(-1) != 1:
        q = q.contiguous()
    out = torch.empty(b, h, dv, dtype=q.dtype, device=q.device)
    splits, per = splits_for(block_tables.shape[1] * block_size)
    bg, bd, bdv = max(16, triton.next_power_of_2(g)), triton.next_power_of_2(d), triton.next_power_of_2(dv)
    meta = dict(SPLIT=per, G=g, BLOCK_G=bg, D=d, BLOCK_D=bd, DV=dv, BLOCK_DV=bdv, BS=block_size, BLOCK_N=BLOCK_N,
                FP32=q.dtype == torch.float32)
    with _on(q.device):
        if splits == 1:
            _decode_kernel[(b, hkv, 1)](q, k_cache, v_cache, block_tables, context_lens, out, out, out, q.stride(0),
                                        q.stride(1), block_tables.stride(0), h, hkv, scale, SPLITS=1, FINAL=True,
                                        num_warps=4, **meta)
            return out
        acc = torch.empty(b * hkv * splits * bg, bdv, dtype=torch.float32, device=q.device)
        m = torch.empty(b * hkv * splits * bg, dtype=torch.float32, device=q.device)
        l = torch.empty_like(m)  # noqa: E741
        _decode_kernel[(b, hkv, splits)](q, k_cache, v_cache, block_tables, context_lens, acc, m, l, q.stride(0),
                                         q.stride(1), block_tables.stride(0), h, hkv, scale, SPLITS=splits,
                                         FINAL=False, num_warps=4, **meta)
        _merge_kernel[(b, hkv)](acc, m, l, out, h, hkv, splits, G=g, BLOCK_G=bg, DV=dv, BLOCK_DV=bdv,
                                BLOCK_S=triton.next_power_of_2(splits), num_warps=4)
    return out
