"""CUDA-graph decode against eager decode and the CPU reference: tokens identical, logits close, buckets,
widths and the eager fallbacks."""

from __future__ import annotations

import pytest
import torch
from tiny import make_hf, save_hf

import tandem
from tandem.engine import Engine, EngineConfig, SamplingParams, Sequence
from tandem.engine.graphs import GraphRunner
from tandem.models.attention import Batch, PagedMeta

pytestmark = pytest.mark.gpu

RTOL = 1e-4  # float32, as [A]


# DeepSeek with dense MLPs only: MLA without the (not yet capturable) routed-experts reference
@pytest.fixture(scope="module", params=["llama", "deepseek_v3_dense", "deepseek_v2_dense"])
def pair(request, tmp_path_factory, helpers):
    path = helpers.save_family(request.param, tmp_path_factory.mktemp(request.param))
    cpu = tandem.load(path, rules="none", dtype="float32", progress=False)
    gpu = tandem.load(path, dtype="float32", device="cuda", progress=False)
    return cpu, gpu


PROMPTS = [list(range(3, 6)), list(range(20, 37)), list(range(40, 100)), [7], list(range(60, 69))]
NEW = [14, 6, 12, 3, 9]  # sequences leave at different steps: the batch walks down the buckets 8, 4, 2, 1


def run(llm, graphs: bool, block_size: int = 4) -> tuple[list[list[int]], Engine]:
    engine = Engine(llm.model, llm.eos_ids, None, EngineConfig(max_batch=8, kv_tokens=1024, block_size=block_size,
                                                               cuda_graphs=graphs))
    seqs = [engine.add(Sequence(p, SamplingParams(max_new_tokens=n, ignore_eos=True))) for p, n in zip(PROMPTS, NEW)]
    while engine.has_work():
        engine.step()
    return [s.output for s in seqs], engine


def test_graph_decode_equals_eager_and_cpu(pair):
    cpu, gpu = pair
    eager, e_eng = run(gpu, graphs=False)
    graph, g_eng = run(gpu, graphs=True)
    assert e_eng.graphs is None
    assert g_eng.graphs.disabled is None, g_eng.graphs.disabled
    assert g_eng.graphs.replays > 0
    assert g_eng.overlapped > 0 and e_eng.overlapped > 0  # greedy steps launched one ahead, graphed and eager
    # prompt 40..99 crosses 16 blocks of 4 tokens: a second, wider graph
    assert {b for b, _ in g_eng.graphs.graphs} >= {1, 2, 4, 8} and len({w for _, w in g_eng.graphs.graphs}) >= 2
    assert graph == eager
    assert graph == [cpu.generate(p, max_new_tokens=n, ignore_eos=True).token_ids for p, n in zip(PROMPTS, NEW)]


def test_graph_logits_close_to_eager(pair, helpers):
    cpu, gpu = pair
    prompts = [torch.tensor(p) for p in PROMPTS[:3]]
    cache, tables, _ = helpers.paged_logits(gpu.model, prompts, [(0, None)])
    starts, nxt = [len(p) for p in prompts], [11, 12, 13]
    runner = GraphRunner(gpu.model, cache, max_batch=4)
    ids = torch.tensor(nxt, device="cuda")
    with torch.inference_mode():
        first = gpu.model.compute_logits(runner.decode(ids, tables, starts)).cpu()  # eager warm-up, then capture
        replay = gpu.model.compute_logits(runner.decode(ids, tables, starts)).cpu()  # the graph
        qlens = [1, 1, 1]
        b = Batch(qlens, starts, cache.bind(tables, starts, qlens), PagedMeta.build(tables, starts, qlens, 4))
        eager = gpu.model.compute_logits(gpu.model(ids, b.positions("cuda"), b)).cpu()
    assert runner.replays == 1 and list(runner.graphs) == [(4, 16)]
    assert helpers.rel_err(first, eager) <= 1e-6 and helpers.rel_err(replay, eager) <= 1e-6
    for i, p in enumerate(PROMPTS[:3]):
        assert helpers.rel_err(replay[i], cpu.logits(p + [nxt[i]])[-1]) <= RTOL


def test_moe_reference_experts_fall_back_to_eager(tmp_path):
    """The routed-experts reference syncs (bincount().tolist()): the warm-up catches it, decode stays eager."""
    path = save_hf(make_hf("qwen3_moe"), tmp_path)
    cpu = tandem.load(path, rules="none", dtype="float32", progress=False)
    gpu = tandem.load(path, dtype="float32", device="cuda", progress=False)
    out, engine = run(gpu, graphs=True)
    assert engine.graphs.disabled and not engine.graphs.graphs
    print("fallback reason:", engine.graphs.disabled)
    assert out == [cpu.generate(p, max_new_tokens=n, ignore_eos=True).token_ids for p, n in zip(PROMPTS, NEW)]


def test_cuda_graphs_can_be_turned_off(tmp_path):
    path = save_hf(make_hf("llama"), tmp_path)
    assert tandem.load(path, dtype="float32", device="cuda", progress=False, cuda_graphs=False).engine.graphs is None
    assert tandem.load(path, dtype="float32", device="cuda", progress=False).engine.graphs is not None


@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v3"])
def test_hybrid_preset_graphs_equal_eager_and_cpu(name, tmp_path):
    """The family's 1gpu preset (routed experts on the CPU): graphs (host nodes where the MoE operator vouches
    for them, else the eager fallback) give the eager and the CPU tokens."""
    path = save_hf(make_hf(name), tmp_path)
    cpu = tandem.load(path, rules="none", dtype="float32", progress=False)
    outs = []
    for graphs in (False, True):
        llm = tandem.load(path, rules="1gpu", dtype="float32", progress=False, cuda_graphs=graphs)
        out, engine = run(llm, graphs=graphs)
        outs.append(out)
        if graphs:
            print(f"{name} 1gpu: graph replays {engine.graphs.replays}, off because: {engine.graphs.disabled}")
    assert outs[0] == outs[1]
    assert outs[1] == [cpu.generate(p, max_new_tokens=n, ignore_eos=True).token_ids for p, n in zip(PROMPTS, NEW)]


GPU_EXPERTS = '''
- match: {name: "\\\\.experts$"}
  replace:
    class: tandem.ops.Experts
    kwargs: {generate_device: "cuda:0", prefill_device: "cuda:0", out_device: "cuda:0", generate_op: "experts.marlin",
             prefill_op: "experts.marlin", weight_format: "fp32"}
  recursive: false
- match: {name: "rotary_emb$"}
  replace: {class: rope, kwargs: {generate_device: "cuda:0", prefill_device: "cuda:0"}}
- match: {name: "\\\\.gate$"}
  replace: {class: gate, kwargs: {generate_device: "cuda:0", prefill_device: "cuda:0"}}
- match: {name: ".*"}
  replace: {class: default, kwargs: {generate_device: "cuda:0", prefill_device: "cuda:0"}}
'''


@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v3", "qwen2_moe", "mixtral"])
def test_gpu_experts_decode_in_cuda_graphs(name, tmp_path):
    """Routed experts on the GPU (experts.marlin, fp32 blocks: the checkpoint's weights), the RoPE and router
    operators too: decode is captured and replayed (no eager fallback), tokens == eager == the CPU model."""
    from gpu_ref import write_rules

    path = save_hf(make_hf(name), tmp_path)
    cpu = tandem.load(path, rules="none", dtype="float32", progress=False)
    llm = tandem.load(path, rules=write_rules(tmp_path, GPU_EXPERTS), dtype="float32", progress=False)
    eager, _ = run(llm, graphs=False)
    graph, engine = run(llm, graphs=True)
    assert engine.graphs.disabled is None, engine.graphs.disabled
    assert engine.graphs.replays > 0 and {b for b, _ in engine.graphs.graphs} >= {1, 2, 4, 8}
    assert graph == eager
    assert graph == [cpu.generate(p, max_new_tokens=n, ignore_eos=True).token_ids for p, n in zip(PROMPTS, NEW)]
