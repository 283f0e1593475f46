"""The Ollama API: /api/chat and /api/generate (NDJSON streaming and not), /api/tags."""

from __future__ import annotations

import json

import httpx

MSG = [{"role": "user", "content": "Hello, how are you today?"}]
GREEDY = {"temperature": 0, "num_predict": 12}


def test_tags_and_version(live):
    tags = httpx.get(live.url + "/api/tags").json()
    assert [m["name"] for m in tags["models"]] == ["tiny"]
    assert httpx.get(live.url + "/api/version").json()["version"]


def test_chat_stream_and_plain_agree_with_openai(live):
    body = {"model": "tiny", "messages": MSG, "options": GREEDY}
    with httpx.stream("POST", live.url + "/api/chat", json=body, timeout=30) as r:  # stream defaults to true
        assert r.headers["content-type"].startswith("application/x-ndjson")
        objs = [json.loads(line) for line in r.iter_lines() if line]
    assert all(not o["done"] for o in objs[:-1]) and objs[-1]["done"]
    assert objs[-1]["eval_count"] > 0 and objs[-1]["prompt_eval_count"] > 0
    streamed = "".join(o["message"]["content"] for o in objs)
    plain = httpx.post(live.url + "/api/chat", json={**body, "stream": False}, timeout=30).json()
    assert plain["done"] and plain["message"]["content"] == streamed
    assert plain["done_reason"] in ("stop", "length")
    oai = live.client().chat.completions.create(model="tiny", messages=MSG, max_tokens=12, temperature=0)
    assert oai.choices[0].message.content == streamed


def test_generate(live):
    body = {"model": "tiny", "prompt": "The quick brown fox", "raw": True, "stream": False,
            "options": {**GREEDY, "num_predict": 8}}
    out = httpx.post(live.url + "/api/generate", json=body, timeout=30).json()
    assert out["done"] and out["eval_count"] <= 8
    oai = live.client().completions.create(model="tiny", prompt="The quick brown fox", max_tokens=8, temperature=0)
    assert out["response"] == oai.choices[0].text
    # an empty prompt only "loads" the model, as in Ollama
    assert httpx.post(live.url + "/api/generate", json={"model": "tiny"}).json()["done_reason"] == "load"
