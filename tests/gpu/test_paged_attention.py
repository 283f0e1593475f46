"""Triton paged decode attention (tandem.gpu.paged_attention) against a float64 reference of the torch path
(gather the pages, masked softmax attention) on fresh random caches with shuffled block tables: one split and
several, uneven context lengths (1 token, a partial last block, a split boundary), GQA groups of 1 to 8, inside
CUDA-graph capture; and write_kv against index_copy.

Tolerance: the kernel accumulates in fp32 (IEEE dot products), ~1e-6 relative to the fp64 reference over a few
hundred keys; its output is then rounded to the cache dtype, half an ulp: 2^-24 (fp32) or 2^-9 (bf16) of |out|.
Bound used: |out - ref| <= 2 ulp(dtype) * |ref| + 2e-6 * max|ref|.
"""

from __future__ import annotations

import pytest
import torch

from tandem.gpu import paged_attention as pa
from tandem.models.attention import PagedMeta, gather_pages, pad_queries, sdpa_paged, unpad_queries

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(pa.triton is None, reason="needs Triton")]
DEV = "cuda:0"
ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7}


def case(b, h, hkv, d, dv, lens, width, dtype, seed=0, bs=16):
    g = torch.Generator().manual_seed(seed)
    nblocks = b * width + 1
    kc = torch.randn(nblocks * bs, hkv, d, generator=g).to(dtype).to(DEV)
    vc = torch.randn(nblocks * bs, hkv, dv, generator=g).to(dtype).to(DEV)
    perm = torch.randperm(nblocks - 1, generator=g)[: b * width].view(b, width) + 1
    tables = [perm[i, : -(-lens[i] // bs)].tolist() for i in range(b)]
    meta = PagedMeta.build(tables, [n - 1 for n in lens], [1] * b, bs, width_blocks=width).to(DEV)
    q = torch.randn(b, h, d, generator=g).to(dtype).to(DEV)
    return q, kc, vc, meta


def reference(q, kc, vc, meta, scale):
    kk, vv = (gather_pages(c, meta).double() for c in (kc, vc))
    return unpad_queries(sdpa_paged(pad_queries(q.double(), meta), kk, vv, meta, scale, causal_fresh=False), meta)


def check(out, ref, dtype):
    bound = 2 * ULP[dtype] * ref.abs() + 2e-6 * ref.abs().max()
    assert ((out.double() - ref).abs() <= bound).all(), (out.double() - ref).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,h,hkv,d,dv,lens,width", [
    (1, 32, 4, 128, 128, [37], 4),            # Qwen3's heads, one split
    (3, 8, 2, 64, 32, [1, 300, 17], 24),      # 1-token context, partial blocks, two splits
    (2, 4, 4, 128, 128, [700, 5], 48),        # no grouping, three splits, a near-empty sequence
    (4, 16, 2, 128, 128, [256, 257, 33, 512], 64),  # split boundaries
])
def test_decode_attention_matches_reference(dtype, b, h, hkv, d, dv, lens, width):
    q, kc, vc, meta = case(b, h, hkv, d, dv, lens, width, dtype, seed=b * 7 + width)
    scale = d**-0.5
    out = pa.decode_attention(q, kc, vc, meta.block_tables, meta.context_lens, meta.block_size, scale)
    check(out, reference(q, kc, vc, meta, scale), dtype)


def test_write_kv_equals_index_copy():
    q, kc, vc, meta = case(3, 8, 2, 64, 32, [5, 40, 17], 4, torch.bfloat16, seed=3)
    k = torch.randn(3, 2, 64, device=DEV).to(torch.bfloat16)
    v = torch.randn(3, 2, 32, device=DEV).to(torch.bfloat16)
    kc2, vc2 = kc.clone(), vc.clone()
    pa.write_kv(kc2, vc2, k, v, meta.slot_mapping)
    kc.index_copy_(0, meta.slot_mapping, k)
    vc.index_copy_(0, meta.slot_mapping, v)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)


def test_decode_attention_in_a_cuda_graph():
    q, kc, vc, meta = case(2, 32, 4, 128, 128, [100, 400], 32, torch.bfloat16, seed=5)
    scale = 128**-0.5
    pa.decode_attention(q, kc, vc, meta.block_tables, meta.context_lens, meta.block_size, scale)  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = pa.decode_attention(q, kc, vc, meta.block_tables, meta.context_lens, meta.block_size, scale)
    q.copy_(torch.randn_like(q))
    meta.context_lens.copy_(torch.tensor([333, 12], device=DEV))  # lengths change between replays, width fixed
    graph.replay()
    torch.cuda.synchronize()
    check(out, reference(q, kc, vc, meta, scale), torch.bfloat16)
