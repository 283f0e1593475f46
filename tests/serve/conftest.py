"""A live server on 127.0.0.1 (a free port, uvicorn in a thread) over a tiny random Qwen3-MoE."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from serve_tiny import build_tiny_model, free_port  # noqa: E402


class LiveServer:
    def __init__(self, server, port: int):
        import uvicorn

        from tandem.serve import create_app

        self.server, self.port = server, port
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning",
                                timeout_graceful_shutdown=5)
        self.uvicorn = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(15)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics").text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def client(self, **kw):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="session")
def live(tiny_model):
    """max_batch 4 and a queue of 4: eight concurrent requests exercise both the batch and the queue."""
    import tandem
    from tandem.engine import EngineConfig
    from tandem.serve.app import Server

    llm = tandem.load(tiny_model, engine_config=EngineConfig(max_batch=4, kv_tokens=4096), progress=False)
    with LiveServer(Server(llm, "tiny", max_queue=4, aliases=(str(tiny_model),)), free_port()) as srv:
        yield srv
