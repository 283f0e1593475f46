"""MLA's decode entry (tandem.gpu.mla_entry): q_a ‖ kv_a as one projection, then q_a_layernorm, kv_a_layernorm,
k_pe's RoPE and the latent-cache write in one launch. The kernel against the model's layers (RMSNorm,
RotaryEmbedding: fp32 math) and the cache write they feed, on fresh random inputs; graphed decode of the tiny
DeepSeek families through the new path against the old one (TANDEM_MLA_FUSED off) and the CPU reference.

Tolerances: test_fused.py's (the norm's sum order and the last bits of rsqrt / cos / sin; a bf16 output at least 99%
bit-equal to the reference), and bit-equal to tandem.gpu.fused's RoPE kernel (the same steps). Decoded models:
the same tokens on every path.
"""

from __future__ import annotations

import pytest
import torch
from gpu_ref import dequantized_reference, write_rules
from test_fused import YARN, check, norm_reference, step
from test_fused_layer import norm_bound
from tiny import make_hf, save_hf

import tandem
from tandem.gpu import fused, mla_entry
from tandem.gpu.blocks import QuantTensor
from tandem.models.deepseek import MLAttention
from tandem.models.layers import RotaryEmbedding

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(mla_entry.triton is None, reason="needs Triton")]
DEV = "cuda:0"
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]


def rope_bound(x: torch.Tensor, ref: torch.Tensor, scale: float, interleaved: bool) -> torch.Tensor:
    """Each rotated value is a two-term fp32 sum of terms at most scale (|x1| + |x2|) of its pair: 2^-21 of that,
    plus 1.5 output steps where the result rounds to bf16."""
    xf = x.float().abs()
    x1, x2 = (xf[..., 0::2], xf[..., 1::2]) if interleaved else xf.chunk(2, dim=-1)
    mag = scale * (x1 + x2)
    mag = torch.stack((mag, mag), -1).flatten(-2) if interleaved else torch.cat((mag, mag), -1)
    return mag * 2**-21 + (1.5 * step(ref, x.dtype) if x.dtype != torch.float32 else 0.0)


@pytest.mark.parametrize("dtype,w_dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("n,dq,r,rope", [(1, 1536, 512, 64), (5, 24, 16, 8), (8, 96, 48, 16), (3, 0, 512, 64)])
def test_entry_matches_the_layers(dtype, w_dtype, interleaved, n, dq, r, rope):
    """q's norm returned; latent normed ‖ k_pe rotated at the slots, every other cache row untouched (dq = 0: no
    q bottleneck, DeepSeek-V2-Lite)."""
    g = torch.Generator(device=DEV).manual_seed(n * 1000 + dq + r + rope)
    y = (torch.randn(n, dq + r + rope, device=DEV, generator=g) * 2).to(dtype)  # one projection: strided parts
    q, latent, k_pe = y[:, :dq], y[:, dq : dq + r], y[:, dq + r :]
    wq, wkv = ((torch.rand(d, device=DEV, generator=g) + 0.5).to(w_dtype) for d in (dq, r))
    layer = RotaryEmbedding(rope, YARN, 163840, interleaved).to(DEV)
    pos = torch.randint(0, 163840, (n,), device=DEV, generator=g)
    cdt = mla_entry.cache_dtype(y, wkv)
    cache = torch.randn(64, r + rope, device=DEV, generator=g).to(cdt)  # 16 blocks of 4 slots
    before = cache.clone()
    slots = torch.randperm(64, device=DEV, generator=g)[:n]
    oq = mla_entry.norm_rope_to_cache(q if dq else None, y[:, dq:], wq if dq else None, wkv, 1e-6, 1e-5, pos,
                                      layer.inv_freq, layer.scale, interleaved, cache, slots)
    if dq:
        ref, yn = norm_reference(q, wq, 1e-6)
        check(oq, ref, norm_bound(yn, ref, wq, dtype))
        assert oq.is_contiguous()
    else:
        assert oq is None
    ref, yn = norm_reference(latent, wkv, 1e-5)
    check(cache[slots, :r], ref.to(cdt), norm_bound(yn, ref, wkv, dtype).to(torch.float32))
    ref = layer(k_pe[:, None, :], pos)[:, 0]
    check(cache[slots, r:].to(dtype), ref, rope_bound(k_pe, ref, layer.scale, interleaved))
    same = fused.rope(k_pe[:, None, :], pos, layer.inv_freq, layer.scale, interleaved)[:, 0].to(cdt)
    assert torch.equal(cache[slots, r:], same)
    rest = torch.ones(64, dtype=torch.bool, device=DEV)
    rest[slots] = False
    assert torch.equal(cache[rest], before[rest])


def test_entry_in_a_cuda_graph():
    """Captured once, replayed on new rows, positions and slots: what eager launches write."""
    n, dq, r, rope = 4, 1536, 512, 64
    y = torch.randn(n, dq + r + rope, device=DEV, dtype=torch.bfloat16)
    wq, wkv = (torch.rand(d, device=DEV, dtype=torch.bfloat16) + 0.5 for d in (dq, r))
    layer = RotaryEmbedding(rope, YARN, 163840, True).to(DEV)
    pos, slots = torch.zeros(n, dtype=torch.long, device=DEV), torch.arange(n, device=DEV)
    cache, eager = (torch.zeros(256, r + rope, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    args = (wq, wkv, 1e-6, 1e-6, pos, layer.inv_freq, layer.scale, True)
    run = lambda c: mla_entry.norm_rope_to_cache(y[:, :dq], y[:, dq:], *args, c, slots)  # noqa: E731
    run(cache)  # compiles before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        oq = run(cache)
    for seed in range(2):
        torch.manual_seed(seed)
        y.copy_(torch.randn_like(y))
        pos.copy_(torch.randint(0, 100000, (n,), device=DEV))
        slots.copy_(torch.randperm(256, device=DEV)[:n])
        graph.replay()
        want = run(eager)
        assert torch.equal(oq, want) and torch.equal(cache[slots], eager[slots])


def attention_modules(llm) -> list[MLAttention]:
    return [m for m in llm.model.modules() if isinstance(m, MLAttention)]


def check_joined(llm) -> None:
    """Every attention decoded through one projection whose weight its two projections share (views, one copy)."""
    for m in attention_modules(llm):
        j = m._joined
        assert j is not None and sum(j.sizes) == j.weight.shape[0]
        first = m.q_proj if m.a.q_lora_rank is None else m.q_a_proj
        for p in (first, m.kv_a_proj_with_mqa):
            w = p.qweight.data if getattr(p, "qweight", None) is not None else p.weight
            data = j.weight.data if isinstance(j.weight, QuantTensor) else j.weight
            assert w.untyped_storage().data_ptr() == data.untyped_storage().data_ptr()


def decode_both_paths(path, rules, monkeypatch) -> dict[bool, list[list[int]]]:
    """Graphed decode tokens with the entry off and on (the on run checked to have taken it)."""
    from test_graph_decode import run

    calls = []
    entry = mla_entry.norm_rope_to_cache
    monkeypatch.setattr(mla_entry, "norm_rope_to_cache", lambda *a: calls.append(1) or entry(*a))
    outs = {}
    for on in (False, True):
        monkeypatch.setattr(mla_entry, "ENABLED", on)
        calls.clear()
        llm = tandem.load(path, rules=rules, dtype="float32", progress=False)
        outs[on], engine = run(llm, graphs=True)
        assert engine.graphs.disabled is None and engine.graphs.replays > 0, engine.graphs.disabled
        assert bool(calls) == on
        if on:
            check_joined(llm)
        else:
            assert all(m._joined is None for m in attention_modules(llm))
    return outs


def test_mla_entry_decodes_as_the_old_path_and_cpu(tmp_path, monkeypatch):
    """DeepSeek-V3's 1gpu preset (CPU experts as host nodes, plain linears on the GPU), graphed decode: the joined
    projection and the entry launch give the tokens of the old path and of the CPU reference (float32)."""
    from test_graph_decode import NEW, PROMPTS

    path = save_hf(make_hf("deepseek_v3"), tmp_path)
    cpu = tandem.load(path, rules="none", dtype="float32", progress=False)
    want = [cpu.generate(p, max_new_tokens=n, ignore_eos=True).token_ids for p, n in zip(PROMPTS, NEW)]
    outs = decode_both_paths(path, "1gpu", monkeypatch)
    assert outs[True] == outs[False] == want


QUANT_RULES = '''
- match: {name: "self_attn\\\\.(q_a_proj|kv_a_proj_with_mqa|q_proj)$"}
  replace:
    class: KTransformersLinear
    kwargs: {generate_device: "cuda:0", prefill_device: "cuda:0", generate_op: "KLinearMarlin",
             prefill_op: "KLinearMarlin", weight_format: "int8"}
- match: {name: ".*"}
  replace: {class: default, kwargs: {generate_device: "cuda:0", prefill_device: "cuda:0"}}
'''


@pytest.mark.parametrize("name", ["deepseek_v3_dense", "deepseek_v2_dense"])
def test_mla_entry_joins_quantized_projections(name, tmp_path, monkeypatch, helpers):
    """linear.marlin projections (int8 blocks) join as one block weight: the same tokens as the old path and as the
    CPU model holding the dequantized weights."""
    from test_graph_decode import NEW, PROMPTS

    path = helpers.save_family(name, tmp_path / "m")
    rules = write_rules(tmp_path, QUANT_RULES)
    outs = decode_both_paths(path, rules, monkeypatch)
    ref = dequantized_reference(path, tandem.load(path, rules=rules, dtype="float32", progress=False))
    want = [ref.generate(p, max_new_tokens=n, ignore_eos=True).token_ids for p, n in zip(PROMPTS, NEW)]
    assert outs[True] == outs[False] == want
