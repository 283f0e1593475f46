"""GPU attention (paged GQA, MLA absorbed decode, MLA prefill both ways) against the CPU float32 reference."""

from __future__ import annotations

import pytest
import torch
from tiny import FAMILIES, make_hf, save_hf

import tandem
from tandem.models.attention import Batch, PagedMeta

pytestmark = pytest.mark.gpu

RTOL = 1e-4  # [A]'s float32 tolerance; GPU vs CPU differ in summation order only
# bf16: weights and activations rounded to 8 mantissa bits (2^-9 relative each); over 3 layers the CPU
# reference in bf16 drifts ~1e-2 from float32 (measured, dense families; with routing a flipped top-k choice can
# cost 0.14, so bf16 is checked on dense MLPs); 3e-2 still catches a wrong mask, position or head map (~1)
RTOL_BF16 = 3e-2
MLA = [f for f in sorted(FAMILIES) if f.startswith("deepseek")]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request, tmp_path_factory):
    path = save_hf(make_hf(request.param), tmp_path_factory.mktemp(request.param))
    cpu = tandem.load(path, rules="none", dtype="float32", progress=False)
    gpu = tandem.load(path, dtype="float32", device="cuda", progress=False)
    return request.param, path, cpu, gpu


def prompts_for(vocab: int, lengths=(5, 17, 11, 1, 40), seed: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


@pytest.mark.parametrize("absorb", [False, True])
def test_paged_gpu_batch_equals_cpu_alone(pair, helpers, absorb):
    """Many sequences of different lengths in one batch (fresh chunk, chunk over history, decode) == alone."""
    name, _, cpu, gpu = pair
    if absorb and name not in MLA:
        pytest.skip("absorption is MLA's")
    prompts = prompts_for(cpu.model.args.vocab_size)
    alone = [cpu.logits(p.tolist()) for p in prompts]
    cache, tables, (first, second) = helpers.paged_logits(gpu.model, prompts, [(0, 6), (6, None)], absorb=absorb)
    worst = 0.0
    for i in range(len(prompts)):
        worst = max(worst, helpers.rel_err(torch.cat([first[i], second[i]]), alone[i]))
    nxt = [int(a[-1].argmax()) for a in alone]
    starts, qlens = [len(p) for p in prompts], [1] * len(prompts)
    b = Batch(qlens, starts, cache.bind(tables, starts, qlens), PagedMeta.build(tables, starts, qlens, 4))
    with torch.inference_mode():
        step = gpu.model.compute_logits(gpu.model(torch.tensor(nxt, device="cuda"), b.positions("cuda"), b)).cpu()
    for i, p in enumerate(prompts):
        worst = max(worst, helpers.rel_err(step[i], cpu.logits(p.tolist() + [nxt[i]])[-1]))
    print(f"{name} absorb={absorb}: worst relative logit error {worst:.2e}")
    assert worst <= RTOL
    assert all(t.device.type == "cuda" for st in cache.layers.values() for t in st)  # the cache lives on the GPU


def test_mla_cache_holds_latent_and_rope_key_only(pair, helpers):
    name, _, cpu, gpu = pair
    if name not in MLA:
        pytest.skip("MLA only")
    cache, _, _ = helpers.paged_logits(gpu.model, prompts_for(cpu.model.args.vocab_size), [(0, None)])
    a = gpu.model.args
    for st in cache.layers.values():
        assert [tuple(t.shape[1:]) for t in st] == [(a.kv_lora_rank + a.qk_rope_head_dim,)]


def test_engine_on_gpu_equals_cpu(pair):
    """Continuous batching on the GPU (paged, graphs as they apply) gives the CPU's greedy tokens."""
    _, _, cpu, gpu = pair
    prompts = [p.tolist() for p in prompts_for(cpu.model.args.vocab_size, (7, 23, 3), seed=5)]
    want = [cpu.generate(p, max_new_tokens=12, ignore_eos=True).token_ids for p in prompts]
    assert gpu.engine.paged
    from tandem.engine import SamplingParams, Sequence

    seqs = [gpu.engine.add(Sequence(p, SamplingParams(max_new_tokens=12, ignore_eos=True))) for p in prompts]
    while gpu.engine.has_work():
        gpu.engine.step()
    assert [s.output for s in seqs] == want


@pytest.mark.parametrize("name", ["llama", "deepseek_v3_dense", "deepseek_v2_dense"])
def test_bf16_on_gpu_is_close_to_float32(name, helpers, tmp_path):
    path = helpers.save_family(name, tmp_path)
    cpu = tandem.load(path, rules="none", dtype="float32", progress=False)
    gpu = tandem.load(path, dtype="bfloat16", device="cuda", progress=False)
    prompts = prompts_for(cpu.model.args.vocab_size, (9, 30))
    _, _, (first, second) = helpers.paged_logits(gpu.model, prompts, [(0, 8), (8, None)])
    errs = [helpers.rel_err(torch.cat([first[i], second[i]]), cpu.logits(p.tolist())) for i, p in enumerate(prompts)]
    print(f"{name} bf16: relative logit error {max(errs):.2e}")
    assert max(errs) <= RTOL_BF16


RULES = """
- match: {name: "^model\\\\.layers\\\\.\\\\d+\\\\.self_attn$"}
  replace: {class: %s, kwargs: {generate_device: "cuda:0", prefill_device: "cuda:0"%s}}
- match: {name: "^model\\\\.layers\\\\.\\\\d+\\\\.(mlp|block_sparse_moe)\\\\.experts$"}
  replace: {class: tandem.ops.Experts, kwargs: {generate_device: "cpu", prefill_device: "cpu", out_device: "cuda:0"}}
  recursive: false
- match: {name: ".*"}
  replace: {class: default, kwargs: {generate_device: "cuda:0", prefill_device: "cuda:0"}}
"""


@pytest.mark.parametrize("name,op,extra", [("qwen3_moe", "KQwen3MoeAttention", ""),
                                           ("deepseek_v3", "KDeepseekV2Attention", ", absorb_for_prefill: true"),
                                           ("deepseek_v2", "KDeepseekV2Attention", "")])
def test_attention_operators_from_rules(name, op, extra, tmp_path):
    """The attention / mla operators named in a rule file, experts on the CPU: the CPU's greedy tokens."""
    path = save_hf(make_hf(name), tmp_path / "m")
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES % (op, extra))
    cpu = tandem.load(path, rules="none", dtype="float32", progress=False)
    gpu = tandem.load(path, rules=str(rules), dtype="float32", progress=False)
    attn = gpu.model.model.layers[0].self_attn
    assert type(attn).__name__.startswith("AttentionOp") and getattr(attn, "absorb_for_prefill", False) == bool(extra)
    ids = prompts_for(cpu.model.args.vocab_size, (19,), seed=9)[0].tolist()
    assert gpu.generate(ids, max_new_tokens=10, ignore_eos=True).token_ids == \
        cpu.generate(ids, max_new_tokens=10, ignore_eos=True).token_ids


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("name", ["llama", "deepseek_v3"])
def test_two_gpus_keep_each_layers_cache_with_its_layer(name, tmp_path):
    """The family's 2gpu preset (transfer_map at 50%): each layer's paged cache on its GPU, the CPU's tokens,
    decode eager (a graph is captured on one device)."""
    path = save_hf(make_hf(name), tmp_path)
    cpu = tandem.load(path, rules="none", dtype="float32", progress=False)
    gpu = tandem.load(path, rules="2gpu", dtype="float32", progress=False)
    ids = prompts_for(cpu.model.args.vocab_size, (21,), seed=11)[0].tolist()
    assert gpu.generate(ids, max_new_tokens=10, ignore_eos=True).token_ids == \
        cpu.generate(ids, max_new_tokens=10, ignore_eos=True).token_ids
    layers = gpu.engine.cache.layers
    assert {str(st[0].device) for i, st in layers.items() if i < 1} == {"cuda:0"}
    assert {str(st[0].device) for i, st in layers.items() if i >= 2} == {"cuda:1"}
    assert "cuda:1" in gpu.engine.graphs.disabled
