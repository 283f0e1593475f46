"""Greedy decode steps launched one ahead (EngineConfig.overlap): the next step takes the device's tokens before the
host has read them, and a row whose sequence ended meanwhile is thrown away. Forced on here on the CPU (on a GPU it
is the default): outputs, finish reasons and the KV cache's accounting must equal the step-by-step engine's."""

from __future__ import annotations

import pytest

import tandem
from tandem.engine import Engine, EngineConfig, SamplingParams, Sequence
from tandem.synth import synthesize


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = synthesize("tiny-qwen3-moe", tmp_path_factory.mktemp("m"), dtype="float32", progress=False)
    return tandem.load(path, progress=False)


def run(llm, overlap: bool, prompts, params, eos_ids=None, kv_tokens=256):
    cfg = EngineConfig(max_batch=4, kv_tokens=kv_tokens, block_size=4, overlap=overlap)
    engine = Engine(llm.model, llm.eos_ids if eos_ids is None else eos_ids, None, cfg)
    seqs = [engine.add(Sequence(p, q)) for p, q in zip(prompts, params)]
    while engine.has_work():
        engine.step()
    return engine, [(s.output, s.finish_reason) for s in seqs]


PROMPTS = [[5, 9, 13], list(range(20, 47)), [300, 301, 302, 303], [7, 7, 7, 7, 7, 7]]


def test_same_outputs_with_lengths_and_eos(llm):
    lengths = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (9, 3, 14, 1)]
    ref_engine, ref = run(llm, False, PROMPTS, lengths)
    engine, got = run(llm, True, PROMPTS, lengths)
    assert got == ref and engine.overlapped > 0 and ref_engine.overlapped == 0
    assert engine.cache.used_blocks == 0 and engine.launched is None
    # an end of sequence met mid-batch: a token the first sequence produces at its 4th step
    eos = [ref[0][0][3]]
    stops = [SamplingParams(max_new_tokens=12) for _ in PROMPTS]
    _, ref_eos = run(llm, False, PROMPTS, stops, eos_ids=eos)
    engine, got_eos = run(llm, True, PROMPTS, stops, eos_ids=eos)
    assert got_eos == ref_eos and ref_eos[0][1] == "stop" and len(ref_eos[0][0]) == 3
    assert engine.cache.used_blocks == 0


def test_sampled_rows_and_a_small_cache_fall_back_to_step_by_step(llm):
    params = [SamplingParams(max_new_tokens=6, ignore_eos=True), SamplingParams(max_new_tokens=6, temperature=0.8,
                                                                                 seed=3, ignore_eos=True)]
    _, ref = run(llm, False, PROMPTS[:2], params)
    engine, got = run(llm, True, PROMPTS[:2], params)
    assert got == ref and engine.overlapped == 0  # a sampled row: the next input is the host's choice
    greedy = [SamplingParams(max_new_tokens=10, ignore_eos=True)] * 3
    _, ref = run(llm, False, PROMPTS[:3], greedy, kv_tokens=48)  # preemption needed: the host decides
    engine, got = run(llm, True, PROMPTS[:3], greedy, kv_tokens=48)
    assert got == ref and engine.cache.used_blocks == 0


def test_abort_while_a_step_is_in_flight(llm):
    engine = Engine(llm.model, llm.eos_ids, None, EngineConfig(kv_tokens=128, block_size=4, overlap=True))
    a = engine.add(Sequence([1, 2, 3], SamplingParams(max_new_tokens=20, ignore_eos=True)))
    b = engine.add(Sequence([4, 5, 6], SamplingParams(max_new_tokens=20, ignore_eos=True)))
    for _ in range(4):
        engine.step()
    assert engine.launched is not None
    engine.abort(a)
    n = len(a.output)
    while engine.has_work():
        engine.step()
    assert a.finish_reason == "abort" and len(a.output) == n and len(b.output) == 20
    assert engine.cache.used_blocks == 0
