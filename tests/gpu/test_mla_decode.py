"""Triton MLA decode (tandem.gpu.mla_decode) against a float64 reference of absorbed attention over the paged latent
cache, on fresh random caches with shuffled block tables: DeepSeek-V3's shapes (128 heads, r 512, rope 64), the
tiny families' and uneven ones (20 heads, r 96); one split and many, lengths of 1 token, partial last blocks and
past a split; inside CUDA-graph capture; and a tiny DeepSeek model's graphed decode through the kernel.

Tolerance, as a bound on |out - ref| per element, with Σp|c| = Σ_l p_l |c_l| (float64, the reference's):
- bf16: p is rounded to bf16 before p @ c (as the torch path does), each term off by at most 2^-9 relative, so
  the sum by at most 2^-9 Σp|c|; the output is rounded to bf16, 2^-9 |ref|. Scores are sums of exact products in
  fp32 (~1e-5 relative over 576 terms), far inside the factor 2 of slack: 2^-8 (Σp|c| + |ref|); fp16 likewise
  with its 2^-11: 2^-10 (Σp|c| + |ref|).
- fp32: IEEE fp32 throughout; scores of 576 products and sums over a few thousand keys are off by ~1e-6
  relative: 2^-16 (Σp|c| + |ref|). Leaving out or adding one key moves the output by ~p_l |c_l| ≳ 1e-4: caught.
"""

from __future__ import annotations

import pytest
import torch

import tandem
from tandem.gpu import mla_decode as mla
from tandem.models.attention import Batch, PagedMeta, gather_pages, paged_mask

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(mla.triton is None, reason="needs Triton")]
DEV = "cuda:0"
SLACK = {torch.float32: 2.0**-16, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}


def case(b, h, r, rope, lens, width, dtype, seed=0, bs=16):
    """Random q_lat, q_pe, a cache of latent ‖ k_pe rows and the decode metadata of sequences of `lens` tokens."""
    g = torch.Generator().manual_seed(seed)
    nblocks = b * width + 1
    cache = torch.randn(nblocks * bs, r + rope, generator=g).to(dtype).to(DEV)
    perm = torch.randperm(nblocks - 1, generator=g)[: b * width].view(b, width) + 1  # block 0 never used
    tables = [perm[i, : -(-n // bs)].tolist() for i, n in enumerate(lens)]
    meta = PagedMeta.build(tables, [n - 1 for n in lens], [1] * b, bs, width_blocks=width).to(DEV)
    q_lat = torch.randn(b, h, r, generator=g).to(dtype).to(DEV)
    q_pe = torch.randn(b, h, rope, generator=g).to(dtype).to(DEV)
    return q_lat, q_pe, cache, meta


def reference(q_lat, q_pe, cache, meta, scale):
    """(softmax((q_lat·c + q_pe·k_pe) scale) @ c, Σ p |c|) in float64, [B, H, r] each."""
    r = q_lat.shape[2]
    c = gather_pages(cache, meta).double()  # [B, L, r + rope]
    q = torch.cat((q_lat, q_pe), dim=-1).double()  # [B, H, r + rope]
    scores = torch.einsum("bhc,blc->bhl", q, c) * scale
    scores = scores.masked_fill(~paged_mask(meta, c.shape[1])[:, :, 0], float("-inf"))  # [B, 1, L] broadcast
    p = scores.softmax(-1)
    return torch.einsum("bhl,blr->bhr", p, c[..., :r]), torch.einsum("bhl,blr->bhr", p, c[..., :r].abs())


def check(out, q_lat, q_pe, cache, meta, scale, dtype):
    ref, mag = reference(q_lat, q_pe, cache, meta, scale)
    err = (out.double() - ref).abs()
    bound = SLACK[dtype] * (mag + ref.abs())
    assert (err <= bound).all(), f"worst error {err.max().item():.3g}, {(err / bound).max().item():.3g} x bound"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,h,r,rope,lens,width,bs", [
    (4, 128, 512, 64, [1, 37, 300, 1000], 64, 16),   # DeepSeek-V3's heads: eight splits, partial blocks
    (1, 128, 512, 64, [2500], 256, 16),               # batch 1, 4096-token table: 32 splits, most empty
    (8, 128, 512, 64, [900, 3, 64, 700, 1, 33, 1024, 500], 64, 16),  # batch 8: 16-bit dtypes take 64-head tiles
    (2, 16, 512, 64, [64, 65], 8, 64),                # V2-Lite's heads, one block past a split boundary
    (3, 4, 16, 8, [5, 17, 1], 8, 4),                  # the tiny families' shapes: one split
    (3, 4, 16, 8, [130, 7, 64], 40, 4),               # tiny shapes, two splits
    (2, 20, 96, 32, [200, 33], 16, 16),               # heads not a multiple of the head block, r not a power of 2
])
def test_decode_latent_matches_reference(dtype, b, h, r, rope, lens, width, bs):
    q_lat, q_pe, cache, meta = case(b, h, r, rope, lens, width, dtype, seed=b * 7 + width, bs=bs)
    scale = 192**-0.5
    out = mla.decode_latent(q_lat, q_pe, cache, meta.block_tables, meta.context_lens, bs, scale)
    check(out, q_lat, q_pe, cache, meta, scale, dtype)


def test_strided_inputs_and_output():
    """q_lat as the transpose of an [H, B, r] tensor and q_pe as a slice of a wider row, out into [H, B, r]."""
    q_lat, q_pe, cache, meta = case(3, 32, 64, 16, [40, 3, 90], 8, torch.float32, seed=11)
    ql = q_lat.transpose(0, 1).contiguous().transpose(0, 1)
    qp = torch.cat((q_pe, torch.randn_like(q_pe)), dim=-1)[..., :16]
    out_hbr = torch.empty(32, 3, 64, device=DEV)
    mla.decode_latent(ql, qp, cache, meta.block_tables, meta.context_lens, 16, 0.1, out=out_hbr.transpose(0, 1))
    check(out_hbr.transpose(0, 1), q_lat, q_pe, cache, meta, 0.1, torch.float32)


def test_absorbed_decode_equals_reference():
    """The whole absorbed step (W_uk bmm, kernel, W_uv bmm) in fp32 against float64, q_nope a strided view."""
    h, nope, r, rope, v = 16, 32, 64, 16, 24
    q_lat, q_pe, cache, meta = case(2, h, r, rope, [77, 300], 32, torch.float32, seed=4)
    g = torch.Generator().manual_seed(9)
    q = torch.randn(2, h, nope + rope, generator=g).to(DEV)
    w_uk = (torch.randn(h, nope, r, generator=g) / nope**0.5).to(DEV)
    w_uv = (torch.randn(h, v, r, generator=g) / r**0.5).to(DEV)
    q_nope, scale = q[..., :nope], 0.15
    out = mla.absorbed_decode(q_nope, q_pe, cache, w_uk, w_uv, meta.block_tables, meta.context_lens, 16, scale)
    ql = torch.einsum("bhd,hdr->bhr", q_nope.double(), w_uk.double())
    o_lat, mag = reference(ql, q_pe, cache, meta, scale)
    ref = torch.einsum("bhr,hvr->bhv", o_lat, w_uv.double())
    # the latent output's bound (above), carried through W_uv: |Σ_r w (o - o_ref)| <= Σ_r |w| bound_r
    bound = torch.einsum("bhr,hvr->bhv", SLACK[torch.float32] * (mag + o_lat.abs()), w_uv.double().abs())
    assert out.shape == (2, h, v) and ((out.double() - ref).abs() <= bound).all()


def test_decode_in_a_cuda_graph():
    q_lat, q_pe, cache, meta = case(2, 128, 512, 64, [100, 900], 64, torch.bfloat16, seed=5)
    scale = 192**-0.5
    mla.decode_latent(q_lat, q_pe, cache, meta.block_tables, meta.context_lens, 16, scale)  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mla.decode_latent(q_lat, q_pe, cache, meta.block_tables, meta.context_lens, 16, scale)
    q_lat.copy_(torch.randn_like(q_lat))
    meta.context_lens.copy_(torch.tensor([333, 12], device=DEV))  # lengths change between replays, width fixed
    graph.replay()
    torch.cuda.synchronize()
    check(out, q_lat, q_pe, cache, meta, scale, torch.bfloat16)


def test_bad_cache_width_is_a_clear_error():
    q_lat, q_pe, cache, meta = case(1, 4, 16, 8, [5], 2, torch.float32, bs=4)
    with pytest.raises(ValueError, match="latent ‖ k_pe"):
        mla.decode_latent(q_lat, q_pe, cache[:, :20].contiguous(), meta.block_tables, meta.context_lens, 4, 1.0)


@pytest.mark.parametrize("family", ["deepseek_v3_dense", "deepseek_v2_dense"])
def test_tiny_deepseek_graphed_decode_runs_the_kernel(family, tmp_path, helpers, monkeypatch):
    """A tiny DeepSeek's decode step captured in a CUDA graph goes through the kernel and gives the torch path's
    and the CPU reference's logits ([A]'s float32 tolerance 1e-4: the three differ in summation order only)."""
    from tandem.engine.graphs import GraphRunner

    path = helpers.save_family(family, tmp_path)
    cpu = tandem.load(path, rules="none", dtype="float32", progress=False)
    gpu = tandem.load(path, dtype="float32", device="cuda", progress=False)
    prompts = [torch.arange(3, 9), torch.arange(20, 57), torch.arange(40, 100)]
    cache, tables, _ = helpers.paged_logits(gpu.model, prompts, [(0, None)])
    starts, nxt = [len(p) for p in prompts], [11, 12, 13]
    calls = []
    real = mla.absorbed_decode
    monkeypatch.setattr(mla, "absorbed_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    runner = GraphRunner(gpu.model, cache, max_batch=4)
    ids = torch.tensor(nxt, device="cuda")
    with torch.inference_mode():
        runner.decode(ids, tables, starts)  # eager warm-up, then capture
        graph = gpu.model.compute_logits(runner.decode(ids, tables, starts)).cpu()
        assert runner.replays == 1 and calls, "the graph did not capture the MLA kernel"
        monkeypatch.setattr(mla, "ENABLED", False)
        qlens = [1, 1, 1]
        b = Batch(qlens, starts, cache.bind(tables, starts, qlens), PagedMeta.build(tables, starts, qlens, 4))
        torch_path = gpu.model.compute_logits(gpu.model(ids, b.positions("cuda"), b)).cpu()
    assert helpers.rel_err(graph, torch_path) <= 1e-4
    for i, p in enumerate(prompts):
        assert helpers.rel_err(graph[i], cpu.logits(p.tolist() + [nxt[i]])[-1]) <= 1e-4
