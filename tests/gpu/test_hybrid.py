"""Hybrid placements against the CPU reference: routed experts on the CPU kernel with the rest on the GPU (the
overlapped MoE block), hot experts on the GPU, a layer-wise GPU prefill (grouped quantized GEMM and the dense
long-prefill path), and one hybrid layer captured in a CUDA graph (the CPU kernel as a host node)."""

from __future__ import annotations

import pytest
import torch
from gpu_ref import RTOL, rel_err, write_rules
from tiny import FAMILIES, make_hf, save_hf

import tandem
from tandem.gpu import transfer
from tandem.ops.moe import HybridMoE

pytestmark = pytest.mark.gpu
IDS = [3, 17, 42, 7, 99, 1, 64, 12, 5, 150, 33]
MOE_FAMILIES = sorted(f for f in FAMILIES if f != "llama")


@pytest.fixture(scope="module", params=MOE_FAMILIES)
def family(request, tmp_path_factory):
    path = save_hf(make_hf(request.param), tmp_path_factory.mktemp(request.param))
    return path, tandem.load(path, rules="none", dtype="float32", progress=False)


def _hybrid_blocks(llm) -> list[HybridMoE]:
    blocks = [m for m in llm.model.modules() if isinstance(m, HybridMoE)]
    llm.model.model.run_state.phase = "generate"
    return [m for m in blocks if m.cpu_kernel() is not None]


def test_cpu_experts_gpu_rest_equals_cpu(family):
    """The family's 1gpu preset: every MoE block runs hybrid (GPU router and shared experts, CPU experts)."""
    path, ref = family
    llm = tandem.load(path, rules="1gpu", dtype="float32", progress=False, cuda_graphs=False)
    assert _hybrid_blocks(llm)
    assert rel_err(llm.logits(IDS), ref.logits(IDS)) < RTOL
    assert llm.generate(IDS, max_new_tokens=6).token_ids == ref.generate(IDS, max_new_tokens=6).token_ids


HOT = '''
- match: {name: "\\\\.experts$"}
  replace:
    class: tandem.ops.Experts
    kwargs: {generate_device: "cpu", prefill_device: "cpu", out_device: "cuda:0", hot_experts: [0, 2, 5],
             hot_device: "cuda:0"}
  recursive: false
- match: {name: "^model\\\\.embed_tokens$"}
  replace: {class: default, kwargs: {generate_device: "cpu", prefill_device: "cpu"}}
- match: {name: ".*"}
  replace: {class: default, kwargs: {generate_device: "cuda:0", prefill_device: "cuda:0"}}
'''


def test_hot_experts_on_the_gpu_equal_cpu(family, tmp_path):
    path, ref = family
    llm = tandem.load(path, rules=write_rules(tmp_path, HOT), dtype="float32", progress=False, cuda_graphs=False)
    blocks = _hybrid_blocks(llm)
    assert blocks and all(b.experts.hot is not None for b in blocks)
    assert rel_err(llm.logits(IDS), ref.logits(IDS)) < RTOL
    assert llm.generate(IDS, max_new_tokens=6).token_ids == ref.generate(IDS, max_new_tokens=6).token_ids
    assert all(b._hot_gpu is not None for b in blocks)  # computed by the Triton grouped GEMM


LAYERWISE = '''
- match: {name: "^model$"}
  replace: {class: tandem.ops.Model, kwargs: {per_layer_prefill_intput_threshold: 64}}
- match: {name: "\\\\.experts$"}
  replace:
    class: tandem.ops.Experts
    kwargs: {generate_device: "cpu", prefill_device: "cpu", out_device: "cuda:0"}
  recursive: false
- match: {name: "^model\\\\.embed_tokens$"}
  replace: {class: default, kwargs: {generate_device: "cpu", prefill_device: "cpu"}}
- match: {name: ".*"}
  replace: {class: default, kwargs: {generate_device: "cuda:0", prefill_device: "cuda:0"}}
'''


def test_layerwise_prefill_streams_cpu_experts_and_equals_cpu(family, tmp_path, monkeypatch):
    """A 300-token prompt above the threshold: each layer's CPU experts stream to the GPU (double-buffered) and
    the prefill runs there; a short prompt stays hybrid."""
    path, ref = family
    taken = []
    orig = transfer.LayerStreamer.take
    monkeypatch.setattr(transfer.LayerStreamer, "take", lambda self, i: taken.append(i) or orig(self, i))
    llm = tandem.load(path, rules=write_rules(tmp_path, LAYERWISE), dtype="float32", progress=False,
                      cuda_graphs=False)
    n_moe = len(_hybrid_blocks(llm))
    long = [(7 * i + 3) % 150 for i in range(300)]
    assert rel_err(llm.logits(long), ref.logits(long)) < RTOL
    assert taken == list(range(n_moe))
    taken.clear()
    assert rel_err(llm.logits(IDS), ref.logits(IDS)) < RTOL
    assert taken == []


def test_layerwise_prefill_dense_path_equals_cpu(family, tmp_path, monkeypatch):
    """The same 300-token layer-wise prefill with the dense path from 64 tokens: each streamed layer's experts
    dequantized into the shared workspace and computed with one GEMM per expert (fp32 model: no _grouped_mm)."""
    from tandem.gpu import prefill_gemm

    path, ref = family
    calls = []
    orig = prefill_gemm.dense_experts
    monkeypatch.setattr(prefill_gemm, "DENSE_TOKENS", 64)
    monkeypatch.setattr(prefill_gemm, "LOOP_TOKENS", 64)
    monkeypatch.setattr(prefill_gemm, "dense_experts", lambda *a, **kw: calls.append(a[0].shape[0]) or orig(*a, **kw))
    llm = tandem.load(path, rules=write_rules(tmp_path, LAYERWISE), dtype="float32", progress=False,
                      cuda_graphs=False)
    n_moe = len(_hybrid_blocks(llm))
    long = [(5 * i + 11) % 150 for i in range(300)]
    assert rel_err(llm.logits(long), ref.logits(long)) < RTOL
    assert calls == [300] * n_moe
    assert all(m.workspace is None and m.streamed is None for m in llm.model.modules() if isinstance(m, HybridMoE))


def test_hybrid_layer_replays_in_a_cuda_graph(family):
    """One hybrid block captured: router, copies, the C++ kernel as a host node, shared experts on a side
    stream; replayed on new inputs it equals its eager call."""
    path, _ = family
    llm = tandem.load(path, rules="1gpu", dtype="float32", progress=False, cuda_graphs=False)
    block = _hybrid_blocks(llm)[0]
    block.host_nodes = False
    assert not block.graph_capturable  # eager hybrid layer (TANDEM_HOST_NODES=0)
    block.host_nodes = True
    assert block.graph_capturable
    d = block.gate.weight.shape[1]
    x = torch.randn(4, d, device="cuda")
    with torch.inference_mode():
        block(x)  # warm-up: buffers, side stream
        block.warm_graph_buffers(4, x.dtype)
        graph = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            block(x)
            torch.cuda.synchronize()
            with torch.cuda.graph(graph, stream=s):
                y = block(x)
        for seed in range(3):
            torch.manual_seed(seed)
            x.copy_(torch.randn(4, d, device="cuda"))
            graph.replay()
            torch.cuda.synchronize()
            assert rel_err(y, block(x.clone())) < 1e-6
