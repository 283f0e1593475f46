"""Hard edges: the bad-input matrix, 429 on a full queue, disconnects free their slot, API keys, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
from serve_tiny import free_port

MSG = [{"role": "user", "content": "Hello"}]


def _wait_idle(live, timeout: float = 10.0) -> dict:
    """Poll /metrics until no sequence runs or waits and every KV block is free."""
    deadline = time.monotonic() + timeout
    while True:
        m = live.metrics()
        idle = (m["tandem_running_sequences"] == 0 and m["tandem_queue_depth"] == 0
                and m["tandem_kv_cache_used_blocks"] == 0 and m["tandem_requests_in_flight"] == 0)
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def _post(live, path: str, body, **kw) -> httpx.Response:
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(live.url + path, content=data, **{"timeout": 30, **kw})


@pytest.mark.parametrize("body, status, fragment", [
    ("{not json", 400, "malformed JSON"),
    ("[1, 2]", 400, "valid dictionary"),
    ({"model": "tiny"}, 400, "messages"),
    ({"model": "tiny", "messages": "hi"}, 400, "messages"),
    ({"model": "tiny", "messages": []}, 400, "messages"),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ({"model": "tiny", "messages": MSG, "temperature": "hot"}, 400, "temperature"),
    ({"model": "tiny", "messages": MSG, "temperature": 3}, 400, "temperature"),
    ({"model": "tiny", "messages": MSG, "max_tokens": "ten"}, 400, "max_tokens"),
    ({"model": "tiny", "messages": MSG, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny", "messages": MSG, "top_p": 0}, 400, "top_p"),
    ({"model": "tiny", "messages": MSG, "stop": 7}, 400, "stop"),
    ({"model": "tiny", "messages": MSG, "stream": "yes please"}, 400, "stream"),
    ({"model": "tiny", "messages": MSG, "n": 2}, 400, "n > 1"),
    ({"model": "tiny", "messages": MSG, "max_tokens": 100000}, 400, "maximum context length"),
    ({"model": 42, "messages": MSG}, 400, "model"),
    ({"model": "gpt-4o", "messages": MSG}, 404, "does not exist"),
])
def test_bad_chat_requests(live, body, status, fragment):
    r = _post(live, "/v1/chat/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and err["type"]


@pytest.mark.parametrize("path, body, status", [
    ("/v1/completions", {"model": "tiny", "prompt": [99999]}, 400),  # a token id outside the vocabulary
    ("/v1/completions", {"model": "tiny", "prompt": ["a", "b"]}, 400),
    ("/v1/completions", {"model": "tiny", "prompt": ""}, 400),
    ("/v1/completions", {"model": "tiny"}, 400),
    ("/api/chat", {"model": "nope", "messages": MSG}, 404),
    ("/api/chat", {"model": "tiny", "messages": [{"role": "user"}], "options": {"temperature": "x"}}, 400),
    ("/api/generate", "{", 400),
])
def test_bad_requests_other_routes(live, path, body, status):
    r = _post(live, path, body)
    assert r.status_code == status, r.text
    assert "error" in r.json()


def test_prompt_longer_than_context_is_400_before_work(live):
    before = live.metrics()["tandem_tokens_generated_total"]
    long = "experts route tokens " * 400  # well over the 512-token context
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        live.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": long}])
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        live.client().completions.create(model="tiny", prompt=long, max_tokens=4, stream=True)
    assert live.metrics()["tandem_tokens_generated_total"] == before


def test_openai_client_errors(live):
    with pytest.raises(openai.NotFoundError):
        live.client().chat.completions.create(model="gpt-4o", messages=MSG)
    live.server.api_key = "sekrit"
    try:
        with pytest.raises(openai.AuthenticationError):
            live.client(api_key="wrong").chat.completions.create(model="tiny", messages=MSG, max_tokens=2)
        assert httpx.get(live.url + "/v1/models").status_code == 401
        assert httpx.get(live.url + "/api/tags").json() == {"error": "Incorrect API key provided"}
        assert httpx.get(live.url + "/health").status_code == 200  # probes need no key
        ok = live.client(api_key="sekrit").chat.completions.create(model="tiny", messages=MSG, max_tokens=2)
        assert ok.choices[0].message is not None
    finally:
        live.server.api_key = None


def test_stream_disconnect_frees_its_slot(live):
    body = {"model": "tiny", "messages": MSG, "max_tokens": 400, "temperature": 0, "stream": True,
            "ignore_eos": True}
    before = live.metrics()
    with httpx.Client(timeout=30) as http, http.stream("POST", live.url + "/v1/chat/completions",
                                                       content=json.dumps(body)) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]  # some tokens arrived: the sequence is running
        assert any(g.startswith("data: ") for g in got)
        during = live.metrics()
        assert during["tandem_running_sequences"] == 1 and during["tandem_kv_cache_used_blocks"] > 0
    m = _wait_idle(live)
    assert m["tandem_running_sequences"] == 0 and m["tandem_kv_cache_used_blocks"] == 0
    assert m["tandem_requests_in_flight"] == 0
    generated = m["tandem_tokens_generated_total"] - before["tandem_tokens_generated_total"]
    assert generated < 400  # aborted, not run to the end
    assert m.get('tandem_requests_finished_total{reason="disconnect"}', 0) >= 1


def test_non_stream_disconnect_frees_its_slot(live):
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 450, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        _post(live, "/v1/completions", body, timeout=httpx.Timeout(30, read=0.3))
    m = _wait_idle(live)
    assert m["tandem_running_sequences"] == 0 and m["tandem_kv_cache_used_blocks"] == 0


def test_queue_full_is_429(live):
    """max_batch 4 + max_queue 4: the ninth request in flight is refused, the others run to the end."""
    body = {"model": "tiny", "messages": MSG, "max_tokens": 480, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.Client(timeout=30) as http:
        streams = [http.stream("POST", live.url + "/v1/chat/completions", content=json.dumps(body))
                   for _ in range(8)]
        opened = [s.__enter__() for s in streams]
        try:
            assert all(r.status_code == 200 for r in opened)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # the engine's snapshot is at most one step old
                m = live.metrics()
                if m["tandem_running_sequences"] == 4 and m["tandem_queue_depth"] == 4:
                    break
                time.sleep(0.02)
            assert m["tandem_running_sequences"] == 4 and m["tandem_queue_depth"] == 4, m
            assert m["tandem_requests_in_flight"] == 8, m
            with pytest.raises(openai.RateLimitError):
                live.client().chat.completions.create(model="tiny", messages=MSG, max_tokens=2)
            r = _post(live, "/api/generate", {"model": "tiny", "prompt": "hi", "stream": False})
            assert r.status_code == 429 and "busy" in r.json()["error"]
        finally:
            for s in streams:
                s.__exit__(None, None, None)
    m = _wait_idle(live)
    assert m["tandem_kv_cache_used_blocks"] == 0 and m["tandem_requests_in_flight"] == 0


def test_sigterm_finishes_running_requests(tiny_model):
    """`tandem serve` as users start it; SIGTERM lets a running stream finish, then exits 0."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tandem", "serve", str(tiny_model), "--port", str(port),
                             "--max-batch", "2", "--served-model-name", "tiny", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "TANDEM_API_KEY": ""})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.1)
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 60, "temperature": 0, "stream": True,
                "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/completions", content=json.dumps(body), timeout=30) as r:
            lines = r.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
