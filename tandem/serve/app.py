"""The FastAPI app: shared state (`Server`), API-key check, error replies, /health and /metrics."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from tandem.engine import SamplingParams, Sequence
from tandem.serve.loop import EngineLoop, Event
from tandem.serve.metrics import render_metrics
from tandem.serve.parsing import OutputParser, template_features
from tandem.serve.protocol import APIError

log = logging.getLogger("tandem.serve")


@dataclass
class Server:
    """Everything a request handler needs; one per app (no module-level request state)."""

    llm: object  # tandem.LLM
    model_name: str
    api_key: str | None = None
    max_queue: int = 64  # requests beyond max_batch that may wait; more get 429
    aliases: tuple[str, ...] = ()  # other names accepted for the model (the path it was loaded from)
    loop: EngineLoop = None
    created: int = field(default_factory=lambda: int(time.time()))
    active: int = 0  # admitted requests not yet finished (asyncio thread only)
    finished: Counter = field(default_factory=Counter)  # finish reason -> count
    rejected: Counter = field(default_factory=Counter)  # error status -> count

    def __post_init__(self):
        self.loop = self.loop or EngineLoop(self.llm.engine)
        tok = self.llm.tokenizer
        self.reasoning, self.tool_calls = template_features(tok.chat_template if tok is not None else None)

    # ------------------------------------------------------------------ limits

    @property
    def max_batch(self) -> int:
        return self.llm.engine.config.max_batch

    @property
    def context(self) -> int:
        """Tokens one sequence may hold: the model's positions, bounded by the KV cache."""
        return min(self.llm.model.args.max_position_embeddings, self.llm.engine.config.kv_tokens)

    def check_model(self, name: str) -> None:
        if name != self.model_name and name not in self.aliases:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{self.model_name}'",
                           code="model_not_found", param="model")

    # ------------------------------------------------------------------ prompts

    def chat_prompt(self, messages: list[dict], tools: list | None = None, **kwargs) -> tuple[list[int], str]:
        tok = self.llm.tokenizer
        if tok is None:
            raise APIError(400, "this model has no tokenizer, so it cannot chat")
        if tools:
            kwargs["tools"] = tools
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
        except ValueError as e:  # TemplateError: the template rejected these messages
            raise APIError(400, str(e), param="messages") from None
        return tok.encode(text, add_special_tokens=False), text

    def text_prompt(self, prompt: str | list[int]) -> list[int]:
        try:
            return self.llm.encode_prompt(prompt)
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from None

    def parser(self, prompt_text: str, tools: bool) -> OutputParser:
        in_reasoning = self.reasoning and prompt_text.rstrip().endswith("<think>")
        return OutputParser(self.reasoning, tools and self.tool_calls, in_reasoning)

    def sampling(self, prompt: list[int], max_tokens: int | None, **kw) -> SamplingParams:
        """SamplingParams for a prompt; 400 if the prompt (plus max_tokens) does not fit the context."""
        n, ctx = len(prompt), self.context
        if n == 0:
            raise APIError(400, "the prompt is empty", param="prompt")
        if n >= ctx:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens; the prompt has {n} tokens",
                           code="context_length_exceeded", param="messages")
        if max_tokens is None:
            max_tokens = ctx - n
        elif n + max_tokens > ctx:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens; you requested {n + max_tokens}"
                           f" ({n} in the prompt, {max_tokens} to generate)", code="context_length_exceeded",
                           param="max_tokens")
        if kw.get("top_k", 0) < 0:
            kw["top_k"] = 0
        stop = kw.pop("stop", None)
        try:
            return SamplingParams(max_new_tokens=max_tokens, stop=[stop] if isinstance(stop, str) else stop or [],
                                  **kw)
        except ValueError as e:
            raise APIError(400, str(e)) from None

    # ------------------------------------------------------------------ running

    def admit(self) -> None:
        if not self.loop.alive:
            raise APIError(503, "the engine is not running", type="server_error")
        if self.active >= self.max_batch + self.max_queue:
            raise APIError(429, f"server busy: {self.active} requests in flight (limit "
                           f"{self.max_batch + self.max_queue}); retry later", type="rate_limit_exceeded")

    def run(self, prompt: list[int], params: SamplingParams, request: Request) -> AsyncIterator[Event]:
        """Admit now (429 or 503 before any work), then run and yield events as they come."""
        self.admit()
        return self._run(prompt, params, request)

    async def _run(self, prompt: list[int], params: SamplingParams, request: Request) -> AsyncIterator[Event]:
        """A client that goes away aborts the sequence: its KV blocks are free after the next engine step."""
        self.active += 1
        handle = self.loop.submit(Sequence(prompt, params))
        watch = asyncio.ensure_future(_disconnected(request))
        get = None
        try:
            while True:
                get = asyncio.ensure_future(handle.queue.get())
                done, _ = await asyncio.wait({get, watch}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:  # the client is gone
                    return
                event = get.result()
                if event.finish_reason is not None:
                    handle.done = True
                    self.finished[event.finish_reason] += 1
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            watch.cancel()
            if get is not None:
                get.cancel()
            if not handle.done:  # the client went away (or the stream was cancelled) before the end
                self.finished["disconnect"] += 1
                self.loop.abort(handle)
            self.active -= 1


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body is already read, so receive() waits for that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def create_app(server: Server) -> FastAPI:
    from tandem.serve import ollama, openai

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.loop.start()
        yield
        server.loop.stop()

    app = FastAPI(title="tandem", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server

    @app.middleware("http")
    async def check_api_key(request: Request, call_next):
        path = request.url.path
        if server.api_key and (path.startswith("/v1") or path.startswith("/api")):
            auth = request.headers.get("authorization", "")
            given = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), server.api_key.encode()):
                err = APIError(401, "Incorrect API key provided", code="invalid_api_key")
                return _error_response(request, err)
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return _error_response(request, e)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, e: RequestValidationError):
        return _error_response(request, APIError(400, _validation_message(e.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error_response(request, APIError(e.status_code, str(e.detail), type=kind))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception("internal error on %s", request.url.path)
        return _error_response(request, APIError(500, f"internal error: {type(e).__name__}", type="server_error"))

    @app.get("/health")
    async def health():
        if not server.loop.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(render_metrics(server), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def root():
        return Response("tandem is running", media_type="text/plain")

    app.include_router(openai.router)
    app.include_router(ollama.router)
    app.add_middleware(JSONBody)
    return app


class JSONBody:
    """Treat every POST body on /v1 and /api as JSON, as OpenAI and Ollama do (`curl -d` sends a form type)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].startswith(("/v1", "/api")):
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


def _error_response(request: Request, e: APIError) -> JSONResponse:
    request.app.state.server.rejected[e.status] += 1
    body = e.ollama() if request.url.path.startswith("/api") else e.openai()
    return JSONResponse(body, status_code=e.status)


def _validation_message(errors) -> str:
    """One line from pydantic's errors: the first problem and where it is."""
    if not errors:
        return "invalid request"
    err = errors[0]
    if err.get("type") == "json_invalid":
        return f"malformed JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}"
    loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
    msg = err.get("msg", "invalid value")
    return f"{loc}: {msg}" if loc else msg
