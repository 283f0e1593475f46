"""Reasoning and tool-call parsing of generated text, whole and fed piece by piece."""

from __future__ import annotations

import pytest

from tandem.serve.parsing import OutputParser


def _run(parser: OutputParser, text: str, step: int) -> tuple[str, str, list]:
    out = []
    for i in range(0, len(text), step):
        out += parser.feed(text[i : i + step])
    rest, calls = parser.finish()
    out += rest
    return ("".join(t for k, t in out if k == "reasoning"), "".join(t for k, t in out if k == "content"), calls)


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_reasoning_then_content(step):
    r, c, calls = _run(OutputParser(reasoning=True), "<think>\nlet me see</think>\n\nThe answer is 4.", step)
    assert (r.strip(), c, calls) == ("let me see", "The answer is 4.", [])


@pytest.mark.parametrize("step", [1, 5, 1000])
def test_reasoning_opened_by_the_prompt(step):
    r, c, _ = _run(OutputParser(reasoning=True, in_reasoning=True), "hmm < think </think>ok <b>", step)
    assert (r, c) == ("hmm < think ", "ok <b>")


def test_no_reasoning_markers_is_all_content():
    assert _run(OutputParser(reasoning=True), "  plain <thin", 2)[1] == "  plain <thin"
    assert _run(OutputParser(), "<think>x</think>y", 1)[1] == "<think>x</think>y"


@pytest.mark.parametrize("step", [1, 7, 1000])
def test_tool_calls(step):
    text = ('Let me check. <tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>'
            '<tool_call>{"name": "time", "arguments": "{\\"tz\\": \\"CET\\"}"}</tool_call>')
    _, c, calls = _run(OutputParser(tools=True), text, step)
    assert c == "Let me check. "
    assert [(x.name, x.arguments) for x in calls] == [("weather", {"city": "Paris"}), ("time", {"tz": "CET"})]
    assert calls[0].openai(0)["function"]["arguments"] == '{"city": "Paris"}'
    assert calls[0].ollama() == {"function": {"name": "weather", "arguments": {"city": "Paris"}}}


def test_malformed_tool_call_stays_text():
    _, c, calls = _run(OutputParser(tools=True), "x <tool_call>{not json}</tool_call>", 4)
    assert (c, calls) == ("x <tool_call>{not json}</tool_call>", [])


def test_tools_reach_the_chat_template(live):
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    msg = [{"role": "user", "content": "Hello"}]
    plain = live.client().chat.completions.create(model="tiny", messages=msg, max_tokens=1, temperature=0)
    with_tools = live.client().chat.completions.create(model="tiny", messages=msg, max_tokens=1, temperature=0,
                                                       tools=tools)
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 10  # the template rendered the tools
    thinking = live.client().chat.completions.create(model="tiny", messages=msg, max_tokens=4, temperature=0,
                                                     extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    # the template opened <think>, so what the model writes (4 random tokens, no </think>) is reasoning
    message = thinking.choices[0].message
    assert message.model_extra["reasoning_content"] and not message.content
