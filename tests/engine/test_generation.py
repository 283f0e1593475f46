"""Engine behaviour on a tiny synthesized model: batching, sampling, stop strings, streaming, cache limits."""

from __future__ import annotations

import pytest
import torch

import tandem
from tandem.engine import Engine, EngineConfig, SamplingParams, Sequence
from tandem.engine.sampling import apply_penalties, sample
from tandem.engine.text import TextStream
from tandem.synth import synthesize
from tandem.tokenize.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = synthesize("tiny-qwen3-moe", tmp_path_factory.mktemp("m"), dtype="float32", progress=False)
    return tandem.load(path, progress=False)


def run_all(engine: Engine, seqs: list[Sequence]) -> None:
    for s in seqs:
        engine.add(s)
    while engine.has_work():
        engine.step()


def test_continuous_batch_equals_alone(llm):
    prompts = [[5, 9, 13], list(range(20, 47)), [300, 301, 302, 303, 304, 305, 306]]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    alone = [llm.generate(p, max_new_tokens=12, ignore_eos=True).token_ids for p in prompts]
    engine = Engine(llm.model, llm.eos_ids, llm.tokenizer, EngineConfig(max_batch=3, kv_tokens=256, block_size=4))
    seqs = [Sequence(p, params) for p in prompts]
    run_all(engine, seqs)
    assert [s.output for s in seqs] == alone
    assert engine.cache.used_blocks == 0  # everything released


def test_preemption_when_cache_is_small_keeps_results(llm):
    prompts = [list(range(10, 30)), list(range(40, 60)), list(range(70, 90))]
    alone = [llm.generate(p, max_new_tokens=10, ignore_eos=True).token_ids for p in prompts]
    # 64 tokens of cache for three sequences of 30: someone must be preempted and recomputed
    engine = Engine(llm.model, llm.eos_ids, None, EngineConfig(max_batch=3, kv_tokens=64, block_size=4))
    seqs = [Sequence(p, SamplingParams(max_new_tokens=10, ignore_eos=True)) for p in prompts]
    run_all(engine, seqs)
    assert [s.output for s in seqs] == alone


def test_chunked_prefill_equals_whole(llm):
    p = list(range(3, 60))
    whole = llm.generate(p, max_new_tokens=8, ignore_eos=True).token_ids
    engine = Engine(llm.model, llm.eos_ids, None, EngineConfig(prefill_chunk=7, kv_tokens=128))
    seq = Sequence(p, SamplingParams(max_new_tokens=8, ignore_eos=True))
    run_all(engine, [seq])
    assert seq.output == whole


def test_abort_frees_blocks(llm):
    engine = Engine(llm.model, llm.eos_ids, None, EngineConfig(kv_tokens=128))
    seq = engine.add(Sequence(list(range(30)), SamplingParams(max_new_tokens=50, ignore_eos=True)))
    engine.step()
    assert engine.cache.used_blocks > 0
    engine.abort(seq)
    assert engine.cache.used_blocks == 0 and seq.finish_reason == "abort" and not engine.has_work()


def test_too_long_request_is_refused(llm):
    engine = Engine(llm.model, llm.eos_ids, None, EngineConfig(kv_tokens=32))
    with pytest.raises(ValueError, match="exceed the KV cache"):
        engine.add(Sequence(list(range(30)), SamplingParams(max_new_tokens=10)))


def test_seeded_sampling_is_reproducible_and_varies(llm):
    kw = dict(max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=50, ignore_eos=True)
    a = llm.generate([1, 2, 3], seed=7, **kw).token_ids
    b = llm.generate([1, 2, 3], seed=7, **kw).token_ids
    c = llm.generate([1, 2, 3], seed=8, **kw).token_ids
    assert a == b and a != c


def test_top_k_1_is_greedy(llm):
    greedy = llm.generate([4, 5, 6], max_new_tokens=10, ignore_eos=True).token_ids
    assert llm.generate([4, 5, 6], max_new_tokens=10, temperature=1.5, top_k=1, seed=3, ignore_eos=True).token_ids \
        == greedy


def test_sampler_filters_match_definitions():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0])
    g = torch.Generator().manual_seed(0)
    # top_p=0.5: token 0 alone has p=0.61 >= 0.5, so it is always chosen
    assert {sample(logits.clone(), SamplingParams(temperature=1.0, top_p=0.5), g) for _ in range(50)} == {0}
    # min_p=0.3: tokens with p >= 0.3 * p_max are tokens 0 and 1
    assert {sample(logits.clone(), SamplingParams(temperature=1.0, min_p=0.3), g) for _ in range(200)} == {0, 1}
    assert {sample(logits.clone(), SamplingParams(temperature=1.0, top_k=2), g) for _ in range(200)} == {0, 1}


def test_penalties_match_their_definitions():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(50, generator=torch.Generator().manual_seed(1))
    prompt, output = [1, 2, 3], [3, 4, 4, 9]
    got = apply_penalties(logits.clone(), SamplingParams(repetition_penalty=1.3), prompt, output)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt + output]), logits.clone()[None])[0]
    assert torch.allclose(got, ref)
    got = apply_penalties(logits.clone(), SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), prompt, output)
    want = logits.clone()
    for t, n in {3: 1, 4: 2, 9: 1}.items():
        want[t] -= 0.5 + 0.25 * n
    assert torch.allclose(got, want)


def test_bad_sampling_params():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)


def test_text_stream_never_splits_utf8(llm):
    tok: Tokenizer = llm.tokenizer
    text = "café 東京 😀 naïve — done"
    stream = TextStream(tok, [])
    pieces = [stream.feed(t) for t in tok.encode(text)] + [stream.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert any(p == "" for p in pieces)  # some ids were only part of a character and had to wait


def test_stop_string_is_cut_and_held_back(llm):
    tok = llm.tokenizer
    stream = TextStream(tok, ["capital of"])
    pieces = []
    for t in tok.encode("What is the capital of France?"):
        pieces.append(stream.feed(t))
        if stream.stopped:
            break
    assert stream.stopped and "".join(pieces) == "What is the "


def test_streaming_equals_whole_text(llm):
    kw = dict(max_new_tokens=20, temperature=0.8, seed=5, ignore_eos=True)
    whole = llm.generate("The quick brown fox", **kw)
    pieces = list(llm.generate("The quick brown fox", stream=True, **kw))
    assert "".join(pieces) == whole.text and len(pieces) > 1


def test_stop_strings_end_generation(llm):
    free = llm.generate("Once upon a time", max_new_tokens=30, ignore_eos=True)
    stop = free.text[5:8]
    assert stop
    out = llm.generate("Once upon a time", max_new_tokens=30, stop=[stop], ignore_eos=True)
    assert out.finish_reason == "stop" and stop not in out.text and free.text.startswith(out.text)


def test_chat_uses_template(llm):
    text = llm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    out = llm.chat([{"role": "user", "content": "hi"}], max_new_tokens=5, ignore_eos=True)
    assert len(out.token_ids) == 5


def test_model_without_tokenizer_works_on_ids(tmp_path):
    path = synthesize("tiny-llama", tmp_path, dtype="float32", progress=False)
    (path / "tokenizer.json").unlink()
    llm = tandem.load(path, progress=False)
    assert llm.tokenizer is None
    assert len(llm.generate([1, 2, 3], max_new_tokens=4, ignore_eos=True).token_ids) == 4
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate("hello")


def test_one_torch_thread_while_sampling_a_gpu_models_logits():
    """Sampling runs in one torch thread for a GPU model (the CPU experts' pool owns the cores) and the thread
    count comes back afterwards, also after an error; a CPU model keeps torch's threads."""
    from tandem.engine.engine import one_torch_thread

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with one_torch_thread(True):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), one_torch_thread(True):
            raise RuntimeError("sampling failed")
        assert torch.get_num_threads() == 2
        with one_torch_thread(False):
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
