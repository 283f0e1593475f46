"""Paged batched attention and the CUDA-graph runner's CPU-side logic (metadata, buckets, padding, fallbacks).

The paged path is what the engine runs on a GPU; here it runs on the CPU against the per-sequence reference.
"""

from __future__ import annotations

import pytest
import torch
from tiny import FAMILIES, make_hf, save_hf
from torch import nn

import tandem
from tandem.engine import Engine, EngineConfig, KVCache, SamplingParams, Sequence
from tandem.engine.graphs import GraphRunner, batch_buckets, capture_blockers, pick_bucket, run_layers, width_bucket
from tandem.models.attention import Batch, PagedMeta

RTOL = 1e-4  # float32, [A]'s tolerance; observed <1e-6 (summation order only)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def llm(request, tmp_path_factory):
    path = save_hf(make_hf(request.param), tmp_path_factory.mktemp(request.param))
    return tandem.load(path, rules="none", dtype="float32", progress=False)  # the torch reference


def test_metadata_of_a_mixed_batch():
    # seq 0: 2 cached + 3 new in blocks [5, 2]; seq 1: 1 new in block [7]; block size 4
    m = PagedMeta.build([[5, 2], [7]], [2, 0], [3, 1], block_size=4, pad_block=9)
    assert m.positions.tolist() == [2, 3, 4, 0]
    assert m.slot_mapping.tolist() == [5 * 4 + 2, 5 * 4 + 3, 2 * 4 + 0, 7 * 4 + 0]
    assert m.block_tables.tolist() == [[5, 2], [7, 9]]
    assert m.context_lens.tolist() == [5, 1] and m.max_qlen == 3 and not m.fresh and not m.decode
    assert m.token_index.tolist() == [0, 1, 2, 3]  # rows of the padded [B * Q] layout
    assert m.width == 8


def test_buckets_and_widths():
    assert batch_buckets(8) == [1, 2, 4, 8] and batch_buckets(12) == [1, 2, 4, 8, 12] and batch_buckets(1) == [1]
    assert [pick_bucket([1, 2, 4, 8], n) for n in (1, 3, 8, 9)] == [1, 4, 8, None]
    assert width_bucket(1, 1024) == 16 and width_bucket(17, 1024) == 32 and width_bucket(33, 40) == 40
    assert width_bucket(5, 4) == 5  # never narrower than the batch needs


def run_paged(llm, prompts, chunks, absorb=False):
    """Score `prompts` through the paged path in prefill chunks, then one decode token; logits per step."""
    for m in llm.model.modules():
        if hasattr(m, "absorb_for_prefill"):
            m.absorb_for_prefill = absorb
    cache, tables, outs = KVCache(num_blocks=32, block_size=4), [[] for _ in prompts], []
    for t, p in zip(tables, prompts):
        cache.grow(t, len(p) + 1)
    for lo, hi in chunks:
        starts, qlens = [min(lo, len(p)) for p in prompts], [len(p[lo:hi]) for p in prompts]
        b = Batch(qlens, starts, cache.bind(tables, starts, qlens), PagedMeta.build(tables, starts, qlens, 4))
        with torch.no_grad():
            ids = torch.cat([p[lo:hi] for p in prompts])
            outs.append(llm.model.compute_logits(llm.model(ids, b.positions(), b)).split(qlens))
    return cache, tables, outs


@pytest.mark.parametrize("absorb", [False, True])
def test_paged_batch_equals_each_alone(llm, absorb):
    g = torch.Generator().manual_seed(3)
    vocab = llm.model.args.vocab_size
    prompts = [torch.randint(0, vocab, (n,), generator=g) for n in (5, 17, 11)]
    alone = [llm.logits(p.tolist()) for p in prompts]
    # a fresh prefill chunk, a chunk over history, then one decode step for all three
    cache, tables, (first, second) = run_paged(llm, prompts, [(0, 4), (4, None)], absorb)
    for i in range(len(prompts)):
        assert rel_err(torch.cat([first[i], second[i]]), alone[i]) <= RTOL
    nxt = [int(a[-1].argmax()) for a in alone]
    starts, qlens = [len(p) for p in prompts], [1, 1, 1]
    b = Batch(qlens, starts, cache.bind(tables, starts, qlens), PagedMeta.build(tables, starts, qlens, 4))
    with torch.no_grad():
        step = llm.model.compute_logits(llm.model(torch.tensor(nxt), b.positions(), b))
    for i, p in enumerate(prompts):
        assert rel_err(step[i], llm.logits(p.tolist() + [nxt[i]])[-1]) <= RTOL


def test_padded_graph_batch_equals_eager(llm):
    """What a graph replays, run eagerly on the CPU: padded rows (sink block) leave the real rows unchanged."""
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, llm.model.args.vocab_size, (n,), generator=g) for n in (6, 13, 9)]
    cache, tables, _ = run_paged(llm, prompts, [(0, None)])
    nxt = torch.tensor([7, 8, 9])
    starts = [len(p) for p in prompts]
    runner = GraphRunner(llm.model, cache, max_batch=8)
    meta = runner.padded(tables, starts, bucket=4, width=width_bucket(max(map(len, tables)), cache.num_blocks))
    assert meta.block_tables.shape == (4, 16) and meta.slot_mapping[3] == cache.sink * cache.block_size
    h = torch.zeros(4, llm.model.args.hidden_size)
    h[:3] = llm.model.model.embed_tokens(nxt)
    batch = Batch([1] * 4, (meta.context_lens - 1).tolist(), cache.bind(meta.block_tables.tolist(),
                  (meta.context_lens - 1).tolist(), [1] * 4), meta)
    with torch.no_grad():
        padded = llm.model.compute_logits(run_layers(llm.model.model, h, meta.positions, batch))[:3]
    for i, p in enumerate(prompts):
        assert rel_err(padded[i], llm.logits(p.tolist() + [int(nxt[i])])[-1]) <= RTOL


def test_engine_paged_equals_reference(llm):
    """Continuous batching with chunked prefill and preemption: the same greedy tokens either way."""
    prompts = [list(range(10, 30)), list(range(40, 47)), list(range(70, 95))]
    outs = []
    for paged in (False, True):
        engine = Engine(llm.model, llm.eos_ids, None, EngineConfig(max_batch=3, kv_tokens=64, block_size=4,
                                                                   prefill_chunk=9, paged=paged))
        seqs = [engine.add(Sequence(p, SamplingParams(max_new_tokens=8, ignore_eos=True))) for p in prompts]
        while engine.has_work():
            engine.step()
        assert engine.graphs is None  # a CPU model never captures
        outs.append([s.output for s in seqs])
    assert outs[0] == outs[1]


class Frozen(nn.Linear):
    graph_capturable = False


def test_capture_blockers_name_what_stops_a_graph(llm):
    decoder = llm.model.model
    said = capture_blockers(decoder, torch.device("cuda", 0))
    assert said and "is on cpu" in said[0]
    assert capture_blockers(decoder, torch.device("cpu")) == []
    decoder.layers[0].extra = Frozen(2, 2)
    try:
        assert capture_blockers(decoder, torch.device("cpu")) == ["model.layers.0.extra (Frozen) is not capturable"]
    finally:
        del decoder.layers[0].extra
    runner = GraphRunner(llm.model, KVCache(4), 4)
    assert runner.decode(torch.tensor([1]), [[0]], [0]) is None and "not a GPU" in runner.disabled
