"""Doorbells on a CUDA stream (tandem.gpu.doorbell): the stream rings, waits in its front end until the C++
kernel's pool has run the CPU experts, and re-arms; eagerly and replayed in a CUDA graph with new inputs each time;
and a hybrid model's graphed decode runs its CPU experts through them. Results are the kernel's own forward,
bit for bit (the same job on the same buffers)."""

from __future__ import annotations

import pytest
import torch

from tandem.gpu import doorbell
from tandem.kernels import cpu as K

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not doorbell.available(), reason="no stream memory operations")]
DEV = "cuda:0"


def test_stream_rings_and_waits_in_a_graph():
    E, I, H, k, T = 16, 128, 256, 4, 3  # noqa: E741
    g = torch.Generator().manual_seed(0)
    w = K.MoEExperts.from_weights(*(torch.randn(E, *s, generator=g) * 0.1 for s in ((I, H), (I, H), (H, I))),
                                  "int8")
    x, out = torch.zeros(T, H).pin_memory(), torch.zeros(T, H).pin_memory()
    ids = torch.zeros(T, k, dtype=torch.int32).pin_memory()
    tw = torch.zeros(T, k).pin_memory()
    bell = doorbell.Doorbell(w.host_job(x, ids, tw, out))
    x_dev = torch.zeros(T, H, device=DEV)
    y = torch.zeros(T, H, device=DEV)

    def step():
        x.copy_(x_dev, non_blocking=True)  # the stream stages x, rings, waits, reads the output
        bell.ring_and_wait(torch.cuda.current_stream())
        y.copy_(out, non_blocking=True)

    def inputs(seed):
        gg = torch.Generator().manual_seed(seed)
        x_dev.copy_(torch.randn(T, H, generator=gg))
        ids.copy_(torch.stack([torch.randperm(E, generator=gg)[:k] for _ in range(T)]).int())
        tw.copy_(torch.rand(T, k, generator=gg))
        return w.forward(x_dev.cpu(), ids, tw)

    ref = inputs(1)
    step()
    torch.cuda.synchronize()
    assert torch.equal(y.cpu(), ref)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    runs = K.doorbell_jobs_run()
    for seed in (2, 3, 4):
        ref = inputs(seed)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y.cpu(), ref)
    assert K.doorbell_jobs_run() - runs == 3


def test_hybrid_graph_decode_uses_doorbells(tmp_path, monkeypatch):
    from tiny import make_hf, save_hf

    import tandem

    monkeypatch.setattr(doorbell, "ENABLED", True)  # opt-in (TANDEM_DOORBELLS=1)

    path = save_hf(make_hf("qwen3_moe"), tmp_path)
    cpu = tandem.load(path, rules="none", dtype="float32", progress=False)
    llm = tandem.load(path, rules="1gpu", dtype="float32", progress=False)
    runs = K.doorbell_jobs_run()
    out = llm.generate([5, 6, 7, 8], max_new_tokens=12, ignore_eos=True).token_ids
    assert llm.engine.graphs.replays > 0 and K.doorbell_jobs_run() > runs
    assert out == cpu.generate([5, 6, 7, 8], max_new_tokens=12, ignore_eos=True).token_ids


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])  # 3 and 2 MoE layers
def test_read_ahead_predicts_the_next_layer_and_changes_no_token(family, tmp_path, monkeypatch):
    from tiny import make_hf, save_hf

    import tandem
    from tandem.ops.moe import HybridMoE

    path = save_hf(make_hf(family), tmp_path)
    prompt = [5, 6, 7, 8]
    ref = tandem.load(path, rules="none", dtype="float32", progress=False).generate(
        prompt, max_new_tokens=12, ignore_eos=True).token_ids
    outs = {}
    for on in (False, True):
        monkeypatch.setattr(HybridMoE, "read_ahead", on)
        llm = tandem.load(path, rules="1gpu", dtype="float32", progress=False)
        before = K.read_ahead_stats()
        outs[on] = llm.generate(prompt, max_new_tokens=12, ignore_eos=True).token_ids
        after = K.read_ahead_stats()
        assert llm.engine.graphs.replays > 0
        if on:  # the tiny models have 2 or 3 hybrid layers: every step reads ahead after all but the last
            assert after["jobs"] > before["jobs"] and after["predicted"] > before["predicted"]
            assert after["needed"] > before["needed"] and after["bytes"] > before["bytes"]
        else:
            assert after["jobs"] == before["jobs"], (before, after)
        del llm
    assert outs[True] == ref and outs[False] == ref
