"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions (SSE streaming), /v1/models."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from tandem.serve.parsing import OutputParser
from tandem.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, Sampling

router = APIRouter()

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _server(request: Request):
    return request.app.state.server


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


def _sampling_kwargs(body: Sampling) -> dict:
    if body.n != 1:
        raise APIError(400, "n > 1 is not supported; send n requests", param="n")
    if body.logprobs:
        raise APIError(400, "logprobs are not supported", param="logprobs")
    return dict(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
                seed=body.seed, repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty, stop=body.stop, ignore_eos=body.ignore_eos)


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _message_dict(m) -> dict:
    d = m.model_dump(exclude_none=True)
    if isinstance(m.content, list):  # [{"type": "text", "text": ...}, ...] -> one string
        if any(p.type != "text" for p in m.content):
            raise APIError(400, "only text content parts are supported", param="messages")
        d["content"] = "".join(p.text or "" for p in m.content)
    return d


@router.get("/v1/models")
async def list_models(request: Request):
    s = _server(request)
    return {"object": "list", "data": [{"id": s.model_name, "object": "model", "created": s.created,
                                        "owned_by": "tandem", "max_model_len": s.context}]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request):
    s = _server(request)
    s.check_model(model_id)
    return {"id": s.model_name, "object": "model", "created": s.created, "owned_by": "tandem"}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    s = _server(request)
    s.check_model(body.model)
    if body.response_format is not None and body.response_format.type != "text":
        raise APIError(400, f"response_format {body.response_format.type!r} is not supported",
                       param="response_format")
    tools = body.tools if body.tool_choice != "none" else None
    prompt, text = s.chat_prompt([_message_dict(m) for m in body.messages], tools, **(body.chat_template_kwargs or {}))
    params = s.sampling(prompt, body.max_completion_tokens or body.max_tokens, **_sampling_kwargs(body))
    parser = s.parser(text, tools=bool(tools))
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    events = s.run(prompt, params, request)
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(_chat_stream(events, parser, rid, created, s.model_name, len(prompt), usage),
                                 media_type="text/event-stream", headers=SSE_HEADERS)

    parts: dict[str, list[str]] = {"content": [], "reasoning": []}
    finish, completion = "length", 0
    async for ev in events:
        _raise_if_error(ev)
        for kind, piece in parser.feed(ev.text):
            parts[kind].append(piece)
        finish, completion = ev.finish_reason or finish, ev.completion_tokens
    rest, calls = parser.finish()
    for kind, piece in rest:
        parts[kind].append(piece)
    message = {"role": "assistant", "content": "".join(parts["content"]) or (None if calls else "")}
    if parts["reasoning"]:
        message["reasoning_content"] = "".join(parts["reasoning"])
    if calls:
        message["tool_calls"] = [c.openai() for c in calls]
        finish = "tool_calls"
    return {"id": rid, "object": "chat.completion", "created": created, "model": s.model_name,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": _usage(len(prompt), completion)}


async def _chat_stream(events: AsyncIterator, parser: OutputParser, rid: str, created: int, model: str,
                       prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
    def chunk(delta: dict, finish: str | None = None) -> str:
        return _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                     "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

    yield chunk({"role": "assistant", "content": ""})
    completion, finish = 0, "length"
    async for ev in events:
        if ev.error is not None or ev.finish_reason in ("error", "abort"):
            yield _sse(APIError(500, ev.error or "the request was cancelled (server shutting down)",
                                type="server_error").openai())
            return
        for kind, piece in parser.feed(ev.text):
            yield chunk({"content": piece} if kind == "content" else {"reasoning_content": piece})
        completion, finish = ev.completion_tokens, ev.finish_reason or finish
    rest, calls = parser.finish()
    for kind, piece in rest:
        yield chunk({"content": piece} if kind == "content" else {"reasoning_content": piece})
    if calls:
        yield chunk({"tool_calls": [c.openai(i) for i, c in enumerate(calls)]})
        finish = "tool_calls"
    yield chunk({}, finish)
    if include_usage:
        yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [], "usage": _usage(prompt_tokens, completion)})
    yield _sse("[DONE]")


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    s = _server(request)
    s.check_model(body.model)
    prompt_in = body.prompt
    if isinstance(prompt_in, list) and prompt_in and isinstance(prompt_in[0], (str, list)):
        if len(prompt_in) != 1:
            raise APIError(400, "only one prompt per request is supported", param="prompt")
        prompt_in = prompt_in[0]
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    prompt = s.text_prompt(prompt_in)
    params = s.sampling(prompt, body.max_tokens if body.max_tokens is not None else 16, **_sampling_kwargs(body))
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    echo = prompt_in if body.echo and isinstance(prompt_in, str) else ""
    events = s.run(prompt, params, request)
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(_completion_stream(events, rid, created, s.model_name, len(prompt), usage, echo),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    text, finish, completion = [echo], "length", 0
    async for ev in events:
        _raise_if_error(ev)
        text.append(ev.text)
        finish, completion = ev.finish_reason or finish, ev.completion_tokens
    return {"id": rid, "object": "text_completion", "created": created, "model": s.model_name,
            "choices": [{"index": 0, "text": "".join(text), "logprobs": None, "finish_reason": finish}],
            "usage": _usage(len(prompt), completion)}


async def _completion_stream(events: AsyncIterator, rid: str, created: int, model: str, prompt_tokens: int,
                             include_usage: bool, echo: str) -> AsyncIterator[str]:
    def chunk(text: str, finish: str | None = None) -> str:
        return _sse({"id": rid, "object": "text_completion", "created": created, "model": model,
                     "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]})

    if echo:
        yield chunk(echo)
    completion = 0
    async for ev in events:
        if ev.error is not None or ev.finish_reason in ("error", "abort"):
            yield _sse(APIError(500, ev.error or "the request was cancelled (server shutting down)",
                                type="server_error").openai())
            return
        completion = ev.completion_tokens
        if ev.text or ev.finish_reason:
            yield chunk(ev.text, ev.finish_reason)
    if include_usage:
        yield _sse({"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [],
                    "usage": _usage(prompt_tokens, completion)})
    yield _sse("[DONE]")


def _raise_if_error(ev) -> None:
    if ev.error is not None or ev.finish_reason == "error":
        raise APIError(500, ev.error or "internal error", type="server_error")
    if ev.finish_reason == "abort":
        raise APIError(503, "the request was cancelled: the server is shutting down", type="server_error")
