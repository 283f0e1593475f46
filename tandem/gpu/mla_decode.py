"""Absorbed multi-head latent attention (MLA) decode over the paged latent cache in Triton: one query per sequence.

The cache row of a token is latent c [r] ‖ roped key k_pe [rope] (models/deepseek.py). Absorbed, every head h
attends with q_lat = W_uk[h]ᵀ q_nope[h] over the latents themselves, so all H heads share one "kv head":

    q_lat             torch.bmm over heads, [H, B, nope] @ W_uk [H, nope, r]                           one launch
    decode_latent     per (sequence, block of BLOCK_H heads, split of the context): softmax((q_lat·c + q_pe·k_pe)
                      scale) @ c with an online softmax in fp32; each key block is loaded once for the block of
                      heads (tl.dot on tensor cores for bf16/fp16); one split writes the output, several write
                      partial sums that a second launch merges (split-K, "flash decoding")
    W_uv              torch.bmm over heads, [H, B, r] @ W_uvᵀ [H, r, v], written straight into [B, H, v]  one launch

against ~25 launches of the torch path (einsum, cat, gather of the whole cache, scores, mask, softmax, p@c, the
W_uv einsum). The split count depends only on the batch size and the block table's width, both fixed for a
captured graph (graphs.py buckets them), and lengths and tables are read on the device: graph-safe, no host sync.

Arithmetic: scores in fp32 (bf16/fp16 products are exact in the fp32 accumulator; fp32 inputs as IEEE fp32, no
TF32); p @ c with p rounded to the input dtype for bf16/fp16 (as the torch path's softmax(...).to(dtype)), IEEE
fp32 for fp32. TANDEM_MLA_DECODE=0 keeps the torch path.
"""

from __future__ import annotations

import functools
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

ENABLED = triton is not None and os.environ.get("TANDEM_MLA_DECODE", "1") != "0"
SPLIT_MIN_TOKENS = 64  # fewest context tokens a split covers: below, the merge costs more than it spreads
MAX_SPLITS = 64
LOG2E = 1.4426950408889634


@dataclass(frozen=True, slots=True)
class Config:
    """Tile shape of decode_latent: heads and keys per step, warps and pipeline stages per program."""

    block_h: int = 16
    block_n: int = 32
    num_warps: int = 4
    num_stages: int = 2


CONFIGS = {torch.float32: Config(16, 16, 4, 1)}  # fp32 tiles are twice the bytes: half the keys per step
DEFAULT = Config()
# many 16-head blocks (DeepSeek-V3's 128 heads at batch 8): 64 heads per program read each key block 4x less often
# (H200, bench/mla_decode.py --sweep, batch 8: context 4096 126 -> 79 us, context 512 19.3 us either way; batch 1
# keeps 16 heads: it needs the programs)
WIDE, WIDE_FROM = Config(64, 32, 8, 2), 64


def config_for(dtype: torch.dtype, batch: int, heads: int) -> Config:
    """The tile shape decode_latent uses by default for this dtype, batch and head count."""
    if dtype in CONFIGS:
        return CONFIGS[dtype]
    return WIDE if heads >= WIDE.block_h and batch * -(-heads // DEFAULT.block_h) >= WIDE_FROM else DEFAULT

if triton is not None:

    @triton.jit
    def _decode_kernel(ql_ptr, qp_ptr, cache_ptr, tables_ptr, lens_ptr, out_ptr, m_ptr, l_ptr, stride_qlb,
                       stride_qlh, stride_qpb, stride_qph, stride_tb, stride_ob, stride_oh, H, SPLITS, SPLIT,
                       scale_log2,
                       R: tl.constexpr, BLOCK_R: tl.constexpr, P: tl.constexpr, BLOCK_P: tl.constexpr,
                       BLOCK_H: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
                       FINAL: tl.constexpr, FP32: tl.constexpr):
        """Program (b, head block, split): heads [hb * BLOCK_H, +BLOCK_H) over context tokens [s * SPLIT, +SPLIT)."""
        b, hb, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        ctx = tl.load(lens_ptr + b).to(tl.int32)
        start = s * SPLIT
        end = tl.minimum(start + SPLIT, ctx)
        g = tl.arange(0, BLOCK_H)
        heads = hb * BLOCK_H + g
        hm = heads < H
        r = tl.arange(0, BLOCK_R)
        p = tl.arange(0, BLOCK_P)
        b64 = b.to(tl.int64)
        ql = tl.load(ql_ptr + b64 * stride_qlb + heads[:, None] * stride_qlh + r[None, :],
                     mask=hm[:, None] & (r[None, :] < R), other=0.0)  # [BLOCK_H, BLOCK_R]
        qp = tl.load(qp_ptr + b64 * stride_qpb + heads[:, None] * stride_qph + p[None, :],
                     mask=hm[:, None] & (p[None, :] < P), other=0.0)  # [BLOCK_H, BLOCK_P]
        m = tl.full([BLOCK_H], float("-inf"), tl.float32)  # running max of the scores, log2 units
        l = tl.zeros([BLOCK_H], tl.float32)  # noqa: E741
        acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            valid = pos < end
            blk = tl.load(tables_ptr + b64 * stride_tb + pos // BS, mask=valid, other=0).to(tl.int64)
            row = (blk * BS + pos % BS) * (R + P)  # the cache row of each key: latent ‖ k_pe
            c = tl.load(cache_ptr + row[:, None] + r[None, :], mask=valid[:, None] & (r[None, :] < R),
                        other=0.0).to(ql.dtype)  # [BLOCK_N, BLOCK_R]
            pe = tl.load(cache_ptr + row[:, None] + R + p[None, :], mask=valid[:, None] & (p[None, :] < P),
                         other=0.0).to(ql.dtype)  # [BLOCK_N, BLOCK_P]
            if FP32:  # IEEE fp32 products (no TF32)
                sc = tl.dot(ql, tl.trans(c), input_precision="ieee")
                sc = tl.dot(qp, tl.trans(pe), acc=sc, input_precision="ieee")
            else:  # bf16 / fp16 products are exact in the fp32 accumulator
                sc = tl.dot(qp, tl.trans(pe), acc=tl.dot(ql, tl.trans(c)))
            sc = tl.where(valid[None, :], sc * scale_log2, float("-inf"))  # [BLOCK_H, BLOCK_N]
            m_new = tl.maximum(m, tl.max(sc, 1))
            alpha = tl.exp2(m - m_new)
            e = tl.exp2(sc - m_new[:, None])
            l = l * alpha + tl.sum(e, 1)  # noqa: E741
            if FP32:
                acc = tl.dot(e, c, acc=acc * alpha[:, None], input_precision="ieee")
            else:  # p in the input dtype on tensor cores, as the torch path's softmax(...).to(dtype) @ c
                acc = tl.dot(e.to(c.dtype), c, acc=acc * alpha[:, None])
            m = m_new
        if FINAL:
            o = acc / l[:, None]
            dst = out_ptr + b64 * stride_ob + heads[:, None] * stride_oh + r[None, :]
            tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=hm[:, None] & (r[None, :] < R))
        else:
            rows = ((b64 * tl.num_programs(1) + hb) * SPLITS + s) * BLOCK_H + g  # partials [B, HB, S, BLOCK_H, ...]
            tl.store(out_ptr + rows[:, None] * BLOCK_R + r[None, :], acc)
            tl.store(m_ptr + rows, m)
            tl.store(l_ptr + rows, l)

    @triton.jit
    def _merge_kernel(acc_ptr, m_ptr, l_ptr, out_ptr, stride_ob, stride_oh, HB, SPLITS, R: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
        """Program (b, head, chunk of r): the splits' partial softmax sums of one head combined."""
        b, h, rc = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        s = tl.arange(0, BLOCK_S)
        sm = s < SPLITS
        rows = ((b.to(tl.int64) * HB + h // BLOCK_H) * SPLITS + s) * BLOCK_H + h % BLOCK_H  # [BLOCK_S]
        m = tl.load(m_ptr + rows, mask=sm, other=float("-inf"))
        l = tl.load(l_ptr + rows, mask=sm, other=0.0)  # noqa: E741
        top = tl.max(m, 0)  # finite: split 0 holds the first key of every sequence
        w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - top))
        denom = tl.sum(w * l, 0)
        cols = rc * BLOCK_C + tl.arange(0, BLOCK_C)
        cm = cols < R
        acc = tl.load(acc_ptr + rows[:, None] * BLOCK_R + cols[None, :], mask=sm[:, None] & cm[None, :], other=0.0)
        o = tl.sum(acc * w[:, None], 0) / denom
        tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + cols, o.to(out_ptr.dtype.element_ty),
                 mask=cm)


def _on(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the Triton interpreter on the CPU: an H200's count, so splits match the GPU's
    return torch.cuda.get_device_properties(device).multi_processor_count


def splits_for(batch: int, head_blocks: int, width_tokens: int, block_n: int, sms: int) -> tuple[int, int]:
    """(splits, tokens per split, a multiple of block_n) for `batch` sequences of `head_blocks` head blocks and a
    block table `width_tokens` wide: enough programs to fill the GPU twice, at least SPLIT_MIN_TOKENS each."""
    want = -(-2 * sms // (batch * head_blocks))
    splits = max(1, min(want, width_tokens // SPLIT_MIN_TOKENS, MAX_SPLITS))
    per = -(-width_tokens // splits)
    per = -(-per // block_n) * block_n
    return -(-width_tokens // per), per


def _rows(x: torch.Tensor, name: str) -> torch.Tensor:
    """x with unit stride along its last dim (the kernel's contiguous loads), copied only if needed."""
    if x.dim() != 3:
        raise ValueError(f"mla_decode: {name} must be [B, H, d], got shape {tuple(x.shape)}")
    return x if x.stride(-1) == 1 else x.contiguous()


def decode_latent(q_lat: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                  context_lens: torch.Tensor, block_size: int, scale: float, out: torch.Tensor | None = None,
                  config: Config | None = None) -> torch.Tensor:
    """q_lat [B, H, r], q_pe [B, H, rope] (any head/batch strides), cache [S, r + rope] (latent ‖ k_pe rows, the new
    token's already written) -> [B, H, r]: softmax((q_lat·c + q_pe·k_pe) scale) @ c over each sequence's
    context_lens[b] cached tokens, found through block_tables [B, W]. `out` may be any [B, H, r] view with unit
    stride along r (e.g. the transpose of an [H, B, r] tensor)."""
    q_lat, q_pe = _rows(q_lat, "q_lat"), _rows(q_pe, "q_pe")
    b, h, r = q_lat.shape
    rope = q_pe.shape[2]
    if q_pe.shape[:2] != (b, h) or cache.dim() != 2 or cache.shape[1] != r + rope or not cache.is_contiguous():
        raise ValueError(f"mla_decode: q_lat {tuple(q_lat.shape)}, q_pe {tuple(q_pe.shape)} need a contiguous cache "
                         f"[S, {r + rope}] (latent ‖ k_pe), got {tuple(cache.shape)}")
    if block_tables.shape[0] != b or context_lens.shape != (b,):
        raise ValueError(f"mla_decode: {b} queries but block_tables {tuple(block_tables.shape)}, context_lens "
                         f"{tuple(context_lens.shape)}")
    cfg = config or config_for(q_lat.dtype, b, h)
    if out is None:
        out = torch.empty(b, h, r, dtype=q_lat.dtype, device=q_lat.device)
    elif out.shape != (b, h, r) or out.stride(-1) != 1:
        raise ValueError(f"mla_decode: out must be [{b}, {h}, {r}] with unit stride along r, got {tuple(out.shape)}")
    hb = -(-h // cfg.block_h)
    splits, per = splits_for(b, hb, block_tables.shape[1] * block_size, cfg.block_n, _sm_count(q_lat.device))
    br, bp = max(16, triton.next_power_of_2(r)), max(16, triton.next_power_of_2(rope))
    meta = dict(R=r, BLOCK_R=br, P=rope, BLOCK_P=bp, BLOCK_H=cfg.block_h, BS=block_size,
                BLOCK_N=cfg.block_n, FP32=q_lat.dtype == torch.float32, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages)
    args = (q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1), block_tables.stride(0))
    scale_log2 = scale * LOG2E  # exp2 in the kernel: softmax(x) = 2^(x log2 e) / sum
    with _on(q_lat.device):
        if splits == 1:
            _decode_kernel[(b, hb, 1)](q_lat, q_pe, cache, block_tables, context_lens, out, out, out, *args,
                                       out.stride(0), out.stride(1), h, 1, per, scale_log2, FINAL=True, **meta)
            return out
        rows = b * hb * splits * cfg.block_h
        acc = torch.empty(rows, br, dtype=torch.float32, device=q_lat.device)
        m = torch.empty(rows, dtype=torch.float32, device=q_lat.device)
        l = torch.empty_like(m)  # noqa: E741
        _decode_kernel[(b, hb, splits)](q_lat, q_pe, cache, block_tables, context_lens, acc, m, l, *args, 0, 0, h,
                                        splits, per, scale_log2, FINAL=False, **meta)
        bs = triton.next_power_of_2(splits)
        bc = max(16, min(br, 4096 // bs))  # a [splits, chunk] tile of partials per program, ~32 registers a thread
        _merge_kernel[(b, h, -(-r // bc))](acc, m, l, out, out.stride(0), out.stride(1), hb, splits, R=r, BLOCK_R=br,
                                           BLOCK_H=cfg.block_h, BLOCK_S=bs, BLOCK_C=bc, num_warps=4)
    return out


def absorbed_decode(q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, w_uk: torch.Tensor,
                    w_uv: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int,
                    scale: float, config: Config | None = None) -> torch.Tensor:
    """MLA decode, absorbed: q_nope [B, H, nope], q_pe [B, H, rope] (roped), W_uk [H, nope, r], W_uv [H, v, r],
    the paged latent cache [S, r + rope] -> [B, H, v]; one bmm, the kernel (and its merge), one bmm."""
    b, h, nope = q_nope.shape
    if w_uk.shape[:2] != (h, nope) or w_uv.shape[0] != h or w_uv.shape[2] != w_uk.shape[2]:
        raise ValueError(f"mla_decode: W_uk {tuple(w_uk.shape)} / W_uv {tuple(w_uv.shape)} do not fit q_nope "
                         f"{tuple(q_nope.shape)}: need [H, nope, r] and [H, v, r]")
    q_lat = torch.bmm(q_nope.transpose(0, 1), w_uk)  # [H, B, r]: cuBLAS reads q_nope's strides in place
    o_lat = torch.empty_like(q_lat)  # [H, B, r], the layout the W_uv bmm batches over
    decode_latent(q_lat.transpose(0, 1), q_pe, cache, block_tables, context_lens, block_size, scale,
                  out=o_lat.transpose(0, 1), config=config)
    y = torch.empty(b, h, w_uv.shape[1], dtype=q_lat.dtype, device=q_lat.device)
    torch.bmm(o_lat, w_uv.transpose(1, 2), out=y.transpose(0, 1))  # [H, B, v] written as [B, H, v]
    return y

