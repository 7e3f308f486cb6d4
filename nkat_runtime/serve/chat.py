"""A chat request's prompt: messages and tools through the model's template, and how its reply is read.

The template renders the tools itself when it knows them (see :mod:`..text.tool_syntax`); otherwise
they are offered in a system message of our own. ``tool_choice`` ``required`` or a named function
becomes a grammar, so the reply is a valid call in the model's own syntax. Whether the template
left the reply inside a reasoning block (``<think>`` at the end of the prompt) is noted for the
reply parser (:mod:`..text.chat_output`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..errors import ChatTemplateError, InvalidRequestError
from ..loader import LoadedModel
from ..request import ChatOptions, GenerationRequest
from ..sampling.params import GrammarSpec
from ..text.chat_output import OutputFormat, opens_reasoning, reasoning_tags
from ..text.tool_syntax import ToolSyntax, detect_syntax, forced_call_grammar, messages_for_template


@dataclass
class ChatPrompt:
    text: str
    output: OutputFormat
    grammar: GrammarSpec | None  # a forced tool call (None: the request's own grammar, if any)
    shown_ids: frozenset[int]  # control tokens among the markers the reply parser must see


def chat_prompt(lm: LoadedModel, req: GenerationRequest, defaults: ChatOptions | None = None) -> ChatPrompt:
    """``defaults``: the server's ``--reasoning-format`` and ``--chat-template-kwargs``."""
    assert req.messages is not None
    opts, defaults = req.chat or ChatOptions(), defaults or ChatOptions()
    template = lm.chat_template
    syntax = detect_syntax(template)
    tools = opts.tools if opts.tools and opts.tool_choice != "none" else None
    extra = {**defaults.template_kwargs, **opts.template_kwargs}
    text = render_messages(lm.render_chat, req.messages, syntax, tools, extra)
    think = reasoning_tags(template)
    output = OutputFormat(tools=syntax if tools else None,
                          reasoning=opts.reasoning_format or defaults.reasoning_format or "none",
                          think=think, thinking_open=opens_reasoning(text, think),
                          tool_names=frozenset(t["function"]["name"] for t in tools or ()))
    grammar = None
    if tools and opts.tool_choice in ("required", "function"):
        chosen = tools
        if opts.tool_choice == "function":
            chosen = [t for t in tools if t["function"]["name"] == opts.tool_name]
            if not chosen:
                raise InvalidRequestError(f"tool_choice names function {opts.tool_name!r}, which is not in 'tools'",
                                          "tool_choice")
        if req.grammar is not None:
            raise InvalidRequestError("a forced tool call (tool_choice) cannot be combined with a grammar or "
                                      "response_format", "tool_choice")
        grammar = GrammarSpec("lark", forced_call_grammar(syntax, chosen, opts.parallel_tool_calls,
                                                          lambda t: _control_id(lm, t)), "tool_choice")
    markers = [syntax.open, syntax.close, "[ARGS]", "[CALL_ID]", "<|python_tag|>", *think]
    shown = frozenset(i for i in (_control_id(lm, m) for m in markers if m) if i is not None)
    return ChatPrompt(text, output, grammar, shown)


def render_messages(render: Callable[..., str], messages: list[dict[str, Any]], syntax: ToolSyntax,
                    tools: list[dict[str, Any]] | None, extra: dict[str, Any],
                    add_generation_prompt: bool = True) -> str:
    """``messages`` (and ``tools``) through ``render`` (a template renderer: ``LoadedModel.render_chat``)."""
    if tools and syntax.native:
        extra = dict(extra, tools=tools)
    try:
        return render(messages_for_template(messages, syntax, tools), add_generation_prompt=add_generation_prompt,
                      **extra)
    except ChatTemplateError:
        if syntax.native or not tools:
            raise
        # some templates refuse a system turn (Gemma 2): the tools go into the first user message
        return render(messages_for_template(messages, syntax, tools, system_role=False),
                      add_generation_prompt=add_generation_prompt, **extra)


def _control_id(lm: LoadedModel, text: str) -> int | None:
    """The id of the control token spelled ``text``, if the vocabulary has one."""
    tok = lm.tokenizer
    tid = tok.token_to_id(text)
    return tid if tid is not None and tok.is_special(tid) else None
