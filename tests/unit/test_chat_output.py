"""The chat reply splitter: reasoning, content and tool calls in each family's syntax, the same
whether the reply comes whole or in pieces of any size; nothing is lost when a call does not parse."""

from __future__ import annotations

import json
import random

import pytest

from nkat_runtime.errors import InvalidRequestError
from nkat_runtime.text.chat_output import OutputFormat, OutputParser, ParsedMessage, reasoning_tags
from nkat_runtime.text.tool_syntax import (
    GENERIC,
    HERMES,
    LLAMA3,
    MISTRAL,
    MISTRAL_V11,
    check_tools,
    detect_syntax,
    messages_for_template,
)

NAMES = frozenset({"get", "b"})


def _ids():
    n = iter(range(10**6))
    return lambda syntax: f"id{next(n)}"


def _summary(msg: ParsedMessage) -> tuple:
    return msg.content, msg.reasoning, [(c.name, json.loads(c.arguments)) for c in msg.calls]


def _streamed(fmt: OutputFormat, text: str, cuts: list[int]) -> ParsedMessage:
    parser, msg, last = OutputParser(fmt, _ids()), ParsedMessage(), 0
    deltas = []
    for cut in [*cuts, len(text)]:
        deltas += parser.feed(text[last:cut])
        last = cut
    deltas += parser.finish()
    for d in deltas:
        msg.content += d.content
        msg.reasoning += d.reasoning
        if d.call is not None:
            msg.calls.append(d.call)
    return msg


CASES = [
    (OutputFormat(HERMES, tool_names=NAMES),
     'Sure.\n<tool_call>\n{"name": "get", "arguments": {"city": "Paris"}}\n</tool_call>\n'
     '<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>',
     ("Sure.\n", "", [("get", {"city": "Paris"}), ("b", {})])),
    (OutputFormat(HERMES, tool_names=NAMES), '{"name": "get", "arguments": {"city": "Rome"}}',  # tags left out
     ("", "", [("get", {"city": "Rome"})])),
    (OutputFormat(HERMES, tool_names=NAMES), '{"name": "Alice", "age": 3}',  # JSON, but no offered function
     ('{"name": "Alice", "age": 3}', "", [])),
    (OutputFormat(HERMES, tool_names=NAMES), '<tool_call>\n{"name": broken\n</tool_call> tail',
     ('<tool_call>\n{"name": broken\n</tool_call> tail', "", [])),
    (OutputFormat(HERMES, tool_names=NAMES), '<tool_call>\n{"name": "get", "arguments": {"x": 1}}',  # no closing tag
     ("", "", [("get", {"x": 1})])),
    (OutputFormat(HERMES, tool_names=NAMES), "a < b and <tool but no call", ("a < b and <tool but no call", "", [])),
    (OutputFormat(LLAMA3), '{"name": "get", "parameters": {"city": "Oslo"}}', ("", "", [("get", {"city": "Oslo"})])),
    (OutputFormat(LLAMA3), '<|python_tag|>{"name": "get", "parameters": {}}', ("", "", [("get", {})])),
    (OutputFormat(LLAMA3), 'The answer: {"name": "get"}', ('The answer: {"name": "get"}', "", [])),
    (OutputFormat(MISTRAL), '[TOOL_CALLS][{"name": "get", "arguments": {"city": "Lima"}}, {"name": "b", "arguments": {}}]',
     ("", "", [("get", {"city": "Lima"}), ("b", {})])),
    (OutputFormat(MISTRAL_V11), '[TOOL_CALLS]get[ARGS]{"city": "Lima"}[TOOL_CALLS]b[CALL_ID]a1b2c3d4e[ARGS]{}',
     ("", "", [("get", {"city": "Lima"}), ("b", {})])),
    (OutputFormat(None, "deepseek"), "<think>\nstep 1 </thin step 2</think>\n\nThe answer.",
     ("The answer.", "\nstep 1 </thin step 2", [])),
    (OutputFormat(None, "deepseek", thinking_open=True), "opened by the template</think>ok",
     ("ok", "opened by the template", [])),
    (OutputFormat(None, "deepseek"), "<think>cut off by the length limit", ("", "cut off by the length limit", [])),
    (OutputFormat(None, "deepseek-legacy"), "<think>r</think>\nok", ("<think>r</think>\nok", "r", [])),
    (OutputFormat(None, "none"), "<think>r</think>ok", ("<think>r</think>ok", "", [])),
    (OutputFormat(None, "deepseek"), "no reasoning at all", ("no reasoning at all", "", [])),
    (OutputFormat(None, "deepseek", think=("[THINK]", "[/THINK]")), "[THINK]hm[/THINK]yes", ("yes", "hm", [])),
    (OutputFormat(HERMES, "deepseek", tool_names=NAMES),
     '<think>need weather</think>\n<tool_call>\n{"name": "get", "arguments": {}}\n</tool_call>',
     ("", "need weather", [("get", {})])),
]


@pytest.mark.parametrize("fmt,text,expected", CASES)
def test_whole_and_streamed_agree(fmt, text, expected):
    assert _summary(OutputParser(fmt, _ids()).parse(text)) == expected
    assert _summary(_streamed(fmt, text, list(range(1, len(text))))) == expected  # one character at a time
    rng = random.Random(len(text))
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 6))))
        assert _summary(_streamed(fmt, text, cuts)) == expected, cuts


def test_content_is_not_held_back_longer_than_a_marker():
    parser = OutputParser(OutputFormat(HERMES, tool_names=NAMES), _ids())
    assert "".join(d.content for d in parser.feed("Hello there, <tool")) == "Hello there, "
    assert "".join(d.content for d in parser.feed("kit>")) == "<toolkit>"


def test_call_ids_are_unique_and_mistral_ids_have_nine_characters():
    p = OutputParser(OutputFormat(MISTRAL))
    calls = p.parse('[TOOL_CALLS][{"name": "a", "arguments": {}}, {"name": "a", "arguments": {}}]').calls
    assert len({c.id for c in calls}) == 2 and all(len(c.id) == 9 and c.id.isalnum() for c in calls)
    deltas = OutputParser(OutputFormat(MISTRAL)).feed('[TOOL_CALLS][{"name": "a", "arguments": {}}, {"name": "b"}]')
    assert [d.call_index for d in deltas if d.call is not None] == [0, 1]  # OpenAI's tool_calls[].index
    hermes = OutputParser(OutputFormat(HERMES)).parse('<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>')
    assert hermes.calls[0].id.startswith("call_")


def test_syntax_detection_and_reasoning_tags():
    assert detect_syntax(None) is GENERIC and detect_syntax("{{ messages }}") is GENERIC
    assert detect_syntax("{% if tools %}<tool_call>{% endif %}") is HERMES
    assert detect_syntax("{% if tools %}<tool_call><function={{ name }}>{% endif %}") is GENERIC  # XML calls
    assert detect_syntax('{{ tools }} "parameters" Environment: ipython') is LLAMA3
    assert detect_syntax("{{ tools }}[TOOL_CALLS][") is MISTRAL
    assert detect_syntax("{{ tools }}[TOOL_CALLS]{{ name }}[ARGS]") is MISTRAL_V11
    assert reasoning_tags(None) == ("<think>", "</think>")
    assert reasoning_tags("x [THINK] y") == ("[THINK]", "[/THINK]")


def test_generic_messages_carry_tools_calls_and_results_as_text():
    tools = check_tools([{"type": "function", "function": {"name": "get", "parameters": {"type": "object"}}}])
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get", "arguments": '{"city": "Rome"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            {"role": "tool", "tool_call_id": "call_2", "content": "warm"}]
    out = messages_for_template(msgs, GENERIC, tools)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.\n\n# Tools") and '"name": "get"' in out[0]["content"]
    assert out[2]["content"] == '<tool_call>\n{"name": "get", "arguments": {"city": "Rome"}}\n</tool_call>'
    assert out[3]["content"] == "<tool_response>\nsunny\n</tool_response>\n<tool_response>\nwarm\n</tool_response>"
    native = messages_for_template(msgs, HERMES, tools)
    assert native[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Rome"}  # an object, as templates print it


@pytest.mark.parametrize("tools,why", [
    ("nope", "must be a list"),
    ([{"type": "retrieval"}], r"tools\[0\]"),
    ([{"type": "function", "function": {"name": "has space"}}], "name"),
    ([{"type": "function", "function": {"name": "a", "parameters": []}}], "parameters"),
    ([{"type": "function", "function": {"name": "a"}}, {"type": "function", "function": {"name": "a"}}], "same name"),
])
def test_bad_tools_are_refused(tools, why):
    with pytest.raises(InvalidRequestError, match=why):
        check_tools(tools)
