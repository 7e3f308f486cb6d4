"""Split a chat reply into reasoning, content and tool calls, while it streams.

:class:`OutputParser` takes the reply's text piece by piece and gives back :class:`Delta` objects:
reasoning text (between ``<think>`` and ``</think>``, or the template's own markers, only at the start
of the reply), content text, and whole tool calls in the model's syntax
(:mod:`.tool_syntax`). Text that might be the start of a marker is held back until it is clear;
nothing is lost: a call that does not parse is returned as content, and a reply that ends inside
the reasoning returns it as reasoning. Streamed and whole replies go through the same code, so they
split the same way.

``reasoning`` follows llama.cpp's ``--reasoning-format``: ``none`` leaves the reasoning inline in the
content, ``deepseek`` moves it to ``reasoning_content``, ``deepseek-legacy`` does both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

from .tool_syntax import ToolSyntax, new_call_id

PYTHON_TAG = "<|python_tag|>"  # Llama 3.1 may open a call with it
REASONING_FORMATS = ("none", "deepseek", "deepseek-legacy", "auto")  # auto = deepseek (llama.cpp)


def reasoning_format(name: str) -> str:
    """A ``--reasoning-format`` / ``reasoning_format`` value as the parser reads it (``auto`` → ``deepseek``)."""
    if name not in REASONING_FORMATS:
        raise ValueError(f"reasoning_format must be one of {', '.join(REASONING_FORMATS)}")
    return "deepseek" if name == "auto" else name
REASONING_TAGS = (("<think>", "</think>"), ("[THINK]", "[/THINK]"), ("<|START_THINKING|>", "<|END_THINKING|>"),
                  ("<seed:think>", "</seed:think>"))


def reasoning_tags(template: str | None) -> tuple[str, str]:
    """The reasoning markers a chat template uses (``<think>`` ... ``</think>`` when it names none)."""
    for tags in REASONING_TAGS:
        if template and tags[0] in template:
            return tags
    return REASONING_TAGS[0]


def opens_reasoning(prompt: str, tags: tuple[str, str]) -> bool:
    """Whether the template left the reply inside a reasoning block (DeepSeek-R1 ends its prompt
    with ``<think>``); the reply then starts with reasoning and no opening marker."""
    return prompt.rstrip().endswith(tags[0])


@dataclass(frozen=True)
class OutputFormat:
    """How to read one chat reply (the preparer builds it from the request and the template)."""

    tools: ToolSyntax | None = None  # parse tool calls in this syntax (None: no tools were offered)
    reasoning: str = "none"  # "none" | "deepseek" | "deepseek-legacy"
    think: tuple[str, str] = REASONING_TAGS[0]
    thinking_open: bool = False  # the prompt ends inside the reasoning (the template opened it)
    tool_names: frozenset[str] = frozenset()  # the offered functions (a bare JSON reply must name one)


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it


@dataclass
class Delta:
    content: str = ""
    reasoning: str = ""
    call: ToolCall | None = None
    call_index: int = 0  # the call's place in the reply (0, 1, ...): OpenAI's tool_calls[].index


@dataclass
class ParsedMessage:
    content: str = ""
    reasoning: str = ""
    calls: list[ToolCall] = field(default_factory=list)


def syntax_bare(fmt: OutputFormat) -> bool:
    """Whether a bare JSON reply is a call only by courtesy (the syntax has its own markers)."""
    return fmt.tools is not None and bool(fmt.tools.open)


def _held(text: str, markers: list[str]) -> int:
    """How many characters at the end of ``text`` could begin one of ``markers``."""
    best = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:n]):
                best = n
                break
    return best


class OutputParser:
    def __init__(self, fmt: OutputFormat, make_id: Callable[[ToolSyntax], str] = new_call_id) -> None:
        self.fmt, self.make_id = fmt, make_id
        self.split = fmt.reasoning in ("deepseek", "deepseek-legacy")
        self.legacy = fmt.reasoning == "deepseek-legacy"
        self.state = ("reasoning" if fmt.thinking_open else "start") if self.split else "content"
        self.buf = ""
        self.seen_content = False  # llama3 calls are the whole reply: only before any content
        self.calls = 0  # tool calls emitted so far

    # --- public ----------------------------------------------------------------------------------
    def feed(self, text: str) -> list[Delta]:
        self.buf += text
        out: list[Delta] = []
        while self._step(out, final=False):
            pass
        return out

    def finish(self) -> list[Delta]:
        out: list[Delta] = []
        while self._step(out, final=True):
            pass
        if self.buf:
            out.append(self._text(self.buf))
            self.buf = ""
        return out

    def parse(self, text: str) -> ParsedMessage:
        msg = ParsedMessage()
        for d in self.feed(text) + self.finish():
            msg.content += d.content
            msg.reasoning += d.reasoning
            if d.call is not None:
                msg.calls.append(d.call)
        return msg

    # --- the state machine -----------------------------------------------------------------------
    def _text(self, text: str) -> Delta:
        if text.strip():
            self.seen_content = True
        return Delta(content=text)

    def _step(self, out: list[Delta], final: bool) -> bool:
        """Consume what can be decided from the buffer; True when the state changed (go again)."""
        return getattr(self, "_on_" + self.state.replace("-", "_"))(out, final)

    def _on_start(self, out: list[Delta], final: bool) -> bool:
        opener = self.fmt.think[0]
        body = self.buf.lstrip()
        if body.startswith(opener):
            if self.legacy:
                out.append(Delta(content=self.buf[: len(self.buf) - len(body)] + opener))
            self.buf, self.state = body[len(opener):], "reasoning"
            return True
        if not final and opener.startswith(body):  # could still become the opener
            return False
        self.state = "content"
        return True

    def _on_reasoning(self, out: list[Delta], final: bool) -> bool:
        closer = self.fmt.think[1]
        at = self.buf.find(closer)
        if at < 0:
            keep = 0 if final else _held(self.buf, [closer])
            text, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep:]
            if text:
                out.append(Delta(reasoning=text, content=text if self.legacy else ""))
            return False
        text = self.buf[:at]
        if text or self.legacy:
            out.append(Delta(reasoning=text, content=text + closer if self.legacy else ""))
        self.buf, self.state = self.buf[at + len(closer):], "after-reasoning"
        return True

    def _on_after_reasoning(self, out: list[Delta], final: bool) -> bool:
        body = self.buf.lstrip()
        if not body and not final:
            return False
        if self.legacy and len(body) < len(self.buf):
            out.append(Delta(content=self.buf[: len(self.buf) - len(body)]))
        self.buf, self.state = body, "content"
        return True

    def _on_content(self, out: list[Delta], final: bool) -> bool:
        syntax = self.fmt.tools
        if syntax is None:
            if self.buf:
                out.append(self._text(self.buf))
                self.buf = ""
            return False
        if not self.seen_content:  # a reply that is one JSON object may be a call (llama3's only form;
            body = self.buf.lstrip()  # Hermes models often leave out the tags, as llama.cpp accepts)
            if not final and PYTHON_TAG.startswith(body):  # nothing yet, or maybe the tag
                return False
            if body.startswith(("{", PYTHON_TAG)):
                self.state = "whole-reply"
                return True
        if not syntax.open:
            if self.buf:
                out.append(self._text(self.buf))
                self.buf = ""
            return False
        at = self.buf.find(syntax.open)
        if at < 0:
            keep = 0 if final else _held(self.buf, [syntax.open])
            text, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep:]
            if text:
                out.append(self._text(text))
            return False
        if at:
            out.append(self._text(self.buf[:at]))
        self.buf, self.state = self.buf[at:], "call"
        return True

    def _on_call(self, out: list[Delta], final: bool) -> bool:
        """``buf`` starts with the syntax's opener: wait for a whole call, then emit it."""
        syntax = self.fmt.tools
        assert syntax is not None
        body = self.buf[len(syntax.open):]
        if syntax.close:
            end = body.find(syntax.close)
            if end < 0 and not final:
                return False
            calls = self._calls(body[:end] if end >= 0 else body)
            used = len(syntax.open) + (end + len(syntax.close) if end >= 0 else len(body))
        else:
            calls, used_body = self._open_calls(body)
            if calls is None and not final:
                return False
            used = len(syntax.open) + used_body
        if calls is None:  # not a call after all: the text stays, as content
            out.append(self._text(self.buf[:used] if used else self.buf))
            self.buf = self.buf[used:] if used else ""
            self.state = "content"
            return bool(self.buf)
        self._emit_calls(out, calls)
        self.buf, self.state = self.buf[used:], "between-calls"
        return True

    def _on_between_calls(self, out: list[Delta], final: bool) -> bool:
        body = self.buf.lstrip()
        if not body and not final:
            return False
        self.buf, self.state = body, "content"
        return True

    def _on_whole_reply(self, out: list[Delta], final: bool) -> bool:
        if not final:
            return False
        text = self.buf.strip()
        text = text[len(PYTHON_TAG):] if text.startswith(PYTHON_TAG) else text
        calls = self._calls(text, separator=";")
        if calls is not None and syntax_bare(self.fmt) and any(c.name not in self.fmt.tool_names for c in calls):
            calls = None  # a JSON answer that merely has a "name" is not a call
        if calls is None:
            out.append(self._text(self.buf))
        else:
            self._emit_calls(out, calls)
        self.buf, self.state = "", "content"
        return False

    def _emit_calls(self, out: list[Delta], calls: list[ToolCall]) -> None:
        for c in calls:
            out.append(Delta(call=c, call_index=self.calls))
            self.calls += 1

    # --- JSON inside a call ----------------------------------------------------------------------
    def _call(self, obj: Any) -> ToolCall | None:
        syntax = self.fmt.tools
        assert syntax is not None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
            return None
        args = obj.get(syntax.args_key, obj.get("arguments", obj.get("parameters", {})))
        text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        return ToolCall(self.make_id(syntax), obj["name"], text)

    def _calls(self, text: str, separator: str = "") -> list[ToolCall] | None:
        """The call(s) in ``text``: JSON objects (or one array of them), nothing else; None if not."""
        decoder, pos, calls = json.JSONDecoder(), 0, []
        text = text.strip()
        while pos < len(text):
            try:
                obj, pos = decoder.raw_decode(text, pos)
            except ValueError:
                return None
            items = obj if isinstance(obj, list) else [obj]
            for item in items:
                call = self._call(item)
                if call is None:
                    return None
                calls.append(call)
            while pos < len(text) and (text[pos].isspace() or (separator and text[pos] == separator)):
                pos += 1
        return calls or None

    def _open_calls(self, body: str) -> tuple[list[ToolCall] | None, int]:
        """Mistral's calls, which no closing marker ends: ``[{...}, ...]`` (v3) or ``name[ARGS]{...}``
        (v11, ``[CALL_ID]id`` allowed before ``[ARGS]``). Returns the calls (None while incomplete
        or when it is not a call) and the characters of ``body`` they took."""
        syntax = self.fmt.tools
        assert syntax is not None
        decoder = json.JSONDecoder()
        stripped = body.lstrip()
        lead = len(body) - len(stripped)
        if syntax.name == "mistral":
            try:
                obj, end = decoder.raw_decode(stripped)
            except ValueError:
                return None, 0
            calls = [self._call(o) for o in (obj if isinstance(obj, list) else [obj])]
            return (None, 0) if not calls or None in calls else (calls, lead + end)  # type: ignore[return-value]
        at = stripped.find("[ARGS]")
        if at <= 0:
            return None, 0
        name = stripped[:at].split("[CALL_ID]")[0].strip()
        try:
            args, end = decoder.raw_decode(stripped, at + len("[ARGS]"))
        except ValueError:
            return None, 0
        call = self._call({"name": name, "arguments": args})
        return ([call], lead + end) if call is not None else (None, 0)
