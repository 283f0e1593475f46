"""Generated text -> reasoning, content and tool calls, as the model's chat template marks them.

Templates of reasoning models (Qwen3, DeepSeek-R1, ...) wrap thoughts in <think>...</think>; Hermes-style tool
calling (Qwen2.5/3, ...) wraps each call in <tool_call>{"name": ..., "arguments": {...}}</tool_call>. The parser
is on only for what the template mentions, works incrementally (streaming) and never emits part of a tag.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
_TOOL_RE = re.compile(re.escape(TOOL_OPEN) + r"\s*(.*?)\s*" + re.escape(TOOL_CLOSE), re.S)


@dataclass(slots=True)
class ToolCall:
    name: str
    arguments: dict | str  # the model's JSON object; OpenAI wants it as a string, Ollama as an object
    id: str = ""

    def __post_init__(self):
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"

    def openai(self, index: int | None = None) -> dict:
        args = self.arguments if isinstance(self.arguments, str) else json.dumps(self.arguments, ensure_ascii=False)
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": args}}
        return out if index is None else {"index": index, **out}

    def ollama(self) -> dict:
        return {"function": {"name": self.name, "arguments": self.arguments}}


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is the start of `tag` (held back: it may become the tag)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class OutputParser:
    """feed(text) -> [(kind, text)] with kind "reasoning" or "content"; finish() -> (last pieces, tool calls)."""

    def __init__(self, reasoning: bool = False, tools: bool = False, in_reasoning: bool = False):
        self.reasoning, self.tools = reasoning, tools
        self.mode = "reasoning" if in_reasoning else ("start" if reasoning else "content")
        self.buf = ""
        self.tool_text = ""
        self.strip_next = False  # drop the blank line a model writes after </think>

    def feed(self, text: str) -> list[tuple[str, str]]:
        self.buf += text
        out: list[tuple[str, str]] = []
        while self.buf:
            if self.mode == "start":
                head = self.buf.lstrip()
                if head.startswith(THINK_OPEN):
                    self.mode, self.buf = "reasoning", head[len(THINK_OPEN) :]
                elif not head or THINK_OPEN.startswith(head):
                    break  # maybe the start of <think>: wait for more
                else:
                    self.mode = "content"
            elif self.mode == "reasoning":
                i = self.buf.find(THINK_CLOSE)
                if i >= 0:
                    out.append(("reasoning", self.buf[:i]))
                    self.mode, self.buf, self.strip_next = "content", self.buf[i + len(THINK_CLOSE) :], True
                    continue
                keep = _partial_suffix(self.buf, THINK_CLOSE)
                out.append(("reasoning", self.buf[: len(self.buf) - keep]))
                self.buf = self.buf[len(self.buf) - keep :]
                break
            elif self.mode == "content":
                if self.strip_next:
                    self.buf = self.buf.lstrip()
                    if not self.buf:
                        break
                    self.strip_next = False
                if not self.tools:
                    out.append(("content", self.buf))
                    self.buf = ""
                    break
                i = self.buf.find(TOOL_OPEN)
                if i >= 0:
                    out.append(("content", self.buf[:i]))
                    self.mode, self.tool_text, self.buf = "tools", self.buf[i:], ""
                    break
                keep = _partial_suffix(self.buf, TOOL_OPEN)
                out.append(("content", self.buf[: len(self.buf) - keep]))
                self.buf = self.buf[len(self.buf) - keep :]
                break
            else:  # tools: everything from the first <tool_call> on is held until the end
                self.tool_text += self.buf
                self.buf = ""
        return [(k, t) for k, t in out if t]

    def finish(self) -> tuple[list[tuple[str, str]], list[ToolCall]]:
        out: list[tuple[str, str]] = []
        if self.buf:
            out.append(("reasoning" if self.mode == "reasoning" else "content", self.buf))
            self.buf = ""
        calls: list[ToolCall] = []
        if self.tool_text:
            calls = parse_tool_calls(self.tool_text)
            if calls is None:  # not well-formed: the client gets the text as it is
                out.append(("content", self.tool_text))
                calls = []
        return out, calls


def parse_tool_calls(text: str) -> list[ToolCall] | None:
    """The calls in `text` (<tool_call>{...}</tool_call> blocks), or None if any block is not a valid call."""
    calls = []
    for body in _TOOL_RE.findall(text):
        try:
            obj = json.loads(body)
        except json.JSONDecodeError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass
        calls.append(ToolCall(obj["name"], args))
    return calls or None


def template_features(template: str | None) -> tuple[bool, bool]:
    """(reasoning, tool calls): which markers the chat template knows."""
    template = template or ""
    return THINK_CLOSE in template or THINK_OPEN in template, TOOL_OPEN in template
