"""The OpenAI API through the official client: plain, streaming, and eight concurrent greedy streams."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

MSG = [{"role": "user", "content": "Hello, how are you today?"}]


def test_models(live):
    models = live.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_chat_completion(live):
    out = live.client().chat.completions.create(model="tiny", messages=MSG, max_tokens=12, temperature=0)
    choice = out.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens > 0
    assert 0 < out.usage.completion_tokens <= 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    if choice.finish_reason == "length":
        assert out.usage.completion_tokens == 12


def test_chat_stream_equals_plain(live):
    client = live.client()
    plain = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=MSG, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[0].choices[0].delta.role == "assistant"


def test_completion_and_stop(live):
    client = live.client()
    full = client.completions.create(model="tiny", prompt="Hello, world! How are", max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0]
    assert full.finish_reason == "length"
    text = full.text
    # a stop string that first appears mid-text: the reply is cut right before it
    cuts = [i for i in range(1, len(text)) if text[i] not in text[:i] and text[i] not in "\ufffd \n"]
    if not cuts:
        pytest.skip(f"no usable stop string in {text!r}")
    stop = text[cuts[0]]
    cut = client.completions.create(model="tiny", prompt="Hello, world! How are", max_tokens=24, temperature=0,
                                    stop=[stop], extra_body={"ignore_eos": True}).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.text == text[: text.index(stop)]


def test_seeded_sampling_repeats(live):
    client = live.client()
    kw = dict(model="tiny", messages=MSG, max_tokens=16, temperature=1.0, top_p=0.9, seed=1234,
              presence_penalty=0.5, frequency_penalty=0.5, extra_body={"top_k": 50})
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_eight_concurrent_streams_match_alone(live):
    """Continuous batching (max_batch 4, so four also wait in the queue) changes nothing in greedy output."""
    client = live.client()
    prompts = [f"Request {i}: tell me about experts and the quick brown fox number {i}" * (1 + i % 3)
               for i in range(8)]

    def stream(i: int) -> str:
        chunks = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompts[i]}],
                                                max_tokens=24 + 4 * i, temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    alone = [stream(i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(stream, range(8)))
    assert together == alone
    assert len(set(alone)) > 1  # the prompts really differ
    m = live.metrics()
    assert m["tandem_running_sequences"] == 0 and m["tandem_kv_cache_used_blocks"] == 0
