"""Ollama-compatible routes: /api/chat, /api/generate (NDJSON streaming), /api/tags, /api/show, /api/version."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

import tandem
from tandem.serve.parsing import OutputParser
from tandem.serve.protocol import APIError, OllamaChatRequest, OllamaGenerateRequest, OllamaOptions

router = APIRouter()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _params(s, prompt: list[int], o: OllamaOptions):
    max_tokens = o.num_predict if o.num_predict is not None and o.num_predict >= 0 else None
    max_tokens = min(max_tokens, s.context - len(prompt)) if max_tokens is not None else None  # Ollama truncates
    return s.sampling(prompt, max_tokens, temperature=o.temperature, top_p=o.top_p, top_k=o.top_k, min_p=o.min_p,
                      seed=o.seed, stop=o.stop, repetition_penalty=o.repeat_penalty,
                      presence_penalty=o.presence_penalty, frequency_penalty=o.frequency_penalty)


def _done_fields(reason: str, prompt_tokens: int, completion: int, start: float, first: float | None) -> dict:
    end = time.perf_counter()
    first = first or end
    ns = 1_000_000_000
    return {"done": True, "done_reason": reason, "total_duration": int((end - start) * ns), "load_duration": 0,
            "prompt_eval_count": prompt_tokens, "prompt_eval_duration": int((first - start) * ns),
            "eval_count": completion, "eval_duration": int((end - first) * ns)}


async def _collect(events: AsyncIterator, parser: OutputParser, emit) -> AsyncIterator[dict]:
    """Engine events -> Ollama objects (emit(content, thinking) -> dict), then the final counts."""
    start, first, completion, reason = time.perf_counter(), None, 0, "length"
    async for ev in events:
        if ev.error is not None or ev.finish_reason in ("error", "abort"):
            raise APIError(500, ev.error or "the request was cancelled: the server is shutting down",
                           type="server_error")
        first = first or time.perf_counter()
        for kind, piece in parser.feed(ev.text):
            yield emit(piece if kind == "content" else "", piece if kind == "reasoning" else "", [])
        completion, reason = ev.completion_tokens, ev.finish_reason or reason
    rest, calls = parser.finish()
    for kind, piece in rest:
        yield emit(piece if kind == "content" else "", piece if kind == "reasoning" else "", [])
    if calls:
        yield emit("", "", calls)
    yield {"_final": (reason, completion, start, first)}


async def _respond(stream: bool, objects: AsyncIterator[dict], final, merge):
    """Streaming: one JSON object per line. Otherwise: the pieces merged into one object."""
    if stream:
        async def lines():
            try:
                async for obj in objects:
                    yield json.dumps(final(obj) if "_final" in obj else obj, ensure_ascii=False) + "\n"
            except APIError as e:
                yield json.dumps(e.ollama()) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")
    pieces = [obj async for obj in objects]
    return merge(pieces[:-1], final(pieces[-1]))


@router.post("/api/chat")
async def chat(body: OllamaChatRequest, request: Request):
    s = request.app.state.server
    s.check_model(body.model)
    if any(m.images for m in body.messages):
        raise APIError(400, "images are not supported by this model")
    if not body.messages:  # Ollama answers an empty chat by loading the model
        return {"model": s.model_name, "created_at": _now(), "message": {"role": "assistant", "content": ""},
                "done": True, "done_reason": "load"}
    kwargs = {"enable_thinking": body.think} if body.think is not None else {}
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    prompt, text = s.chat_prompt(messages, body.tools, **kwargs)
    params = _params(s, prompt, body.options)
    parser = s.parser(text, tools=bool(body.tools))
    events = s.run(prompt, params, request)

    def emit(content: str, thinking: str, calls: list) -> dict:
        msg = {"role": "assistant", "content": content}
        if thinking:
            msg["thinking"] = thinking
        if calls:
            msg["tool_calls"] = [c.ollama() for c in calls]
        return {"model": s.model_name, "created_at": _now(), "message": msg, "done": False}

    def final(obj: dict) -> dict:
        reason, completion, start, first = obj["_final"]
        return {"model": s.model_name, "created_at": _now(), "message": {"role": "assistant", "content": ""},
                **_done_fields(reason, len(prompt), completion, start, first)}

    def merge(pieces: list[dict], last: dict) -> dict:
        msg = {"role": "assistant", "content": "".join(p["message"]["content"] for p in pieces)}
        thinking = "".join(p["message"].get("thinking", "") for p in pieces)
        calls = [c for p in pieces for c in p["message"].get("tool_calls", [])]
        msg.update({"thinking": thinking} if thinking else {}, **({"tool_calls": calls} if calls else {}))
        return {**last, "message": msg}

    return await _respond(body.stream, _collect(events, parser, emit), final, merge)


@router.post("/api/generate")
async def generate(body: OllamaGenerateRequest, request: Request):
    s = request.app.state.server
    s.check_model(body.model)
    if body.images:
        raise APIError(400, "images are not supported by this model")
    if not body.prompt:  # Ollama answers an empty prompt by loading the model
        return {"model": s.model_name, "created_at": _now(), "response": "", "done": True, "done_reason": "load"}
    if body.raw or s.llm.tokenizer is None or not s.llm.tokenizer.chat_template:
        text, prompt = body.prompt, s.text_prompt(body.prompt)
    else:
        messages = ([{"role": "system", "content": body.system}] if body.system else []) + [
            {"role": "user", "content": body.prompt}]
        kwargs = {"enable_thinking": body.think} if body.think is not None else {}
        prompt, text = s.chat_prompt(messages, **kwargs)
    params = _params(s, prompt, body.options)
    parser = s.parser(text, tools=False)
    events = s.run(prompt, params, request)

    def emit(content: str, thinking: str, calls: list) -> dict:
        obj = {"model": s.model_name, "created_at": _now(), "response": content, "done": False}
        return {**obj, "thinking": thinking} if thinking else obj

    def final(obj: dict) -> dict:
        reason, completion, start, first = obj["_final"]
        return {"model": s.model_name, "created_at": _now(), "response": "",
                **_done_fields(reason, len(prompt), completion, start, first)}

    def merge(pieces: list[dict], last: dict) -> dict:
        thinking = "".join(p.get("thinking", "") for p in pieces)
        out = {**last, "response": "".join(p["response"] for p in pieces)}
        return {**out, "thinking": thinking} if thinking else out

    return await _respond(body.stream, _collect(events, parser, emit), final, merge)


@router.get("/api/tags")
async def tags(request: Request):
    s = request.app.state.server
    return {"models": [_model_entry(s)]}


@router.get("/api/ps")
async def ps(request: Request):
    s = request.app.state.server
    return {"models": [{**_model_entry(s), "expires_at": "0001-01-01T00:00:00Z", "size_vram": 0}]}


@router.post("/api/show")
async def show(request: Request):
    s = request.app.state.server
    try:
        body = await request.json()
    except ValueError:
        raise APIError(400, "malformed JSON body") from None
    name = body.get("model") or body.get("name") if isinstance(body, dict) else None
    if not isinstance(name, str):
        raise APIError(400, "model: field required")
    s.check_model(name)
    tok = s.llm.tokenizer
    return {"template": (tok.chat_template if tok is not None else "") or "", "details": _model_entry(s)["details"],
            "model_info": {"general.architecture": s.llm.config.get("model_type", ""),
                           "context_length": s.context}, "capabilities": ["completion"]
            + (["tools"] if s.tool_calls else []) + (["thinking"] if s.reasoning else [])}


@router.get("/api/version")
async def version():
    return {"version": tandem.__version__}


def _model_entry(s) -> dict:
    return {"name": s.model_name, "model": s.model_name,
            "modified_at": datetime.fromtimestamp(s.created, timezone.utc).isoformat().replace("+00:00", "Z"),
            "size": 0, "digest": "", "details": {"format": "safetensors", "family": s.llm.config.get("model_type", ""),
                                                 "parameter_size": "", "quantization_level": ""}}
