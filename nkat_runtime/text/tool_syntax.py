"""How a model writes tool calls, read from its chat template, and what that means for the prompt
and for a forced call.

Each family writes calls its own way, and its chat template says which (the template renders past
calls in the same syntax the model was trained to produce):

- ``hermes`` (Qwen2.5, Qwen3, Hermes 2/3): ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``,
  one block per call;
- ``llama3`` (Llama 3.1-3.3): the reply is one JSON object ``{"name": ..., "parameters": {...}}``;
- ``mistral`` (Mistral Nemo, v3 tokenizer): ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``;
- ``mistral-v11`` (Mistral Small 3.2, Devstral): ``[TOOL_CALLS]name[ARGS]{...}`` per call
  (``[CALL_ID]id`` may sit between the name and ``[ARGS]``);
- ``generic``: a template that knows no tools (Gemma 3, SmolLM2). The tools are described in a system
  message of our own in the Hermes syntax, past calls and tool results are written into the
  messages as text, and the reply is parsed as Hermes.

:func:`forced_call_grammar` is the Lark grammar (llguidance) that makes the model write a valid call
to one of the given tools (``tool_choice`` ``required`` or a named function), in its own syntax.
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass
from typing import Any, Callable, Literal

from ..errors import InvalidRequestError

SyntaxName = Literal["hermes", "llama3", "mistral", "mistral-v11", "generic"]


@dataclass(frozen=True)
class ToolSyntax:
    name: SyntaxName
    open: str = "<tool_call>"  # what starts a call ("" for llama3: the reply is the JSON object)
    close: str = "</tool_call>"  # what ends one ("" when the JSON's own end ends it)
    args_key: str = "arguments"  # the key holding the arguments in the call's JSON
    parallel: bool = True  # more than one call in a reply
    id_length: int = 24  # Mistral's templates insist on 9-character call ids

    @property
    def native(self) -> bool:
        """The template renders tools, calls and results itself."""
        return self.name != "generic"


HERMES = ToolSyntax("hermes")
GENERIC = ToolSyntax("generic")
LLAMA3 = ToolSyntax("llama3", open="", close="", args_key="parameters", parallel=False)
MISTRAL = ToolSyntax("mistral", open="[TOOL_CALLS]", close="", id_length=9)
MISTRAL_V11 = ToolSyntax("mistral-v11", open="[TOOL_CALLS]", close="", id_length=9)


def detect_syntax(template: str | None) -> ToolSyntax:
    """The tool-call syntax a chat template renders (``generic`` when it renders none)."""
    t = template or ""
    if "tools" not in t:
        return GENERIC
    if "[TOOL_CALLS]" in t:
        return MISTRAL_V11 if "[ARGS]" in t else MISTRAL
    if "<tool_call>" in t and "<function=" not in t:  # Qwen3-Coder's XML calls are not JSON
        return HERMES
    if '"parameters"' in t and ("ipython" in t or "<|python_tag|>" in t):
        return LLAMA3
    return GENERIC


def new_call_id(syntax: ToolSyntax) -> str:
    alphabet = string.ascii_letters + string.digits
    body = "".join(secrets.choice(alphabet) for _ in range(syntax.id_length))
    return body if syntax.id_length < 24 else "call_" + body


# --- the prompt ---------------------------------------------------------------------------------
def check_tools(tools: Any) -> list[dict[str, Any]]:
    """OpenAI ``tools``: a list of ``{"type": "function", "function": {"name", "description",
    "parameters"}}``; returned as plain dicts (``parameters`` defaults to an empty object schema)."""
    if not isinstance(tools, list):
        raise InvalidRequestError("'tools' must be a list", "tools")
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise InvalidRequestError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", "tools")
        name = fn.get("name")
        if not isinstance(name, str) or not name or len(name) > 64 or not all(c.isalnum() or c in "_-." for c in name):
            raise InvalidRequestError(f"tools[{i}].function.name must be 1-64 letters, digits, '_', '-' or '.'",
                                      "tools")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise InvalidRequestError(f"tools[{i}].function.parameters must be a JSON schema object", "tools")
        out.append({"type": "function", "function": dict(fn, parameters=params)})
    names = [t["function"]["name"] for t in out]
    if len(set(names)) != len(names):
        raise InvalidRequestError("tools: two functions have the same name", "tools")
    return out


def generic_tools_prompt(tools: list[dict[str, Any]]) -> str:
    """The system text that offers ``tools`` to a model whose template knows none (Hermes style)."""
    lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
            f"{lines}\n</tools>\n\nFor each function call, return a json object with function name and arguments "
            "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def _arguments(fn: dict[str, Any]) -> Any:
    """A past call's arguments as an object (OpenAI sends them as JSON text)."""
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            return json.loads(args)
        except ValueError:
            pass  # left as the client wrote it
    return args


def messages_for_template(messages: list[dict[str, Any]], syntax: ToolSyntax,
                          tools: list[dict[str, Any]] | None, system_role: bool = True) -> list[dict[str, Any]]:
    """``messages`` as the template needs them. Native: tool-call arguments as objects (how the
    templates print them with ``tojson``). Generic: the tools go into the system message (into the
    first user message when not ``system_role``: Gemma 2's template refuses system turns), past
    calls into the assistant's text, tool results into a user turn. The calls' shape was checked
    by the adapter (dicts with a ``function`` dict naming the function)."""
    if syntax.native:
        return [dict(m, tool_calls=[dict(c, function=dict(c["function"], arguments=_arguments(c["function"])))
                                    for c in m["tool_calls"]]) if m.get("tool_calls") else m for m in messages]
    out = []
    if tools:
        prompt = generic_tools_prompt(tools)
        if messages and messages[0].get("role") == "system":
            prompt = f"{messages[0].get('content', '')}\n\n{prompt}".lstrip()
            messages = messages[1:]
        if system_role:
            out.append({"role": "system", "content": prompt})
        elif messages and messages[0].get("role") == "user":
            messages = [dict(messages[0], content=f"{prompt}\n\n{messages[0].get('content', '')}"), *messages[1:]]
        else:
            out.append({"role": "user", "content": prompt})
    previous = None
    for m in messages:
        if m.get("role") == "tool":
            text = f"<tool_response>\n{m.get('content', '')}\n</tool_response>"
            if previous == "tool":  # results in a row share one user turn
                out[-1] = dict(out[-1], content=out[-1]["content"] + "\n" + text)
            else:
                out.append({"role": "user", "content": text})
        elif m.get("tool_calls"):
            parts = [m.get("content") or ""]
            for c in m["tool_calls"]:
                call = {"name": c["function"]["name"], "arguments": _arguments(c["function"])}
                parts.append("<tool_call>\n" + json.dumps(call, ensure_ascii=False) + "\n</tool_call>")
            out.append({"role": m["role"], "content": "\n".join(p for p in parts if p)})
        else:
            out.append({k: v for k, v in m.items() if k != "tool_calls"})
        previous = m.get("role")
    return out


# --- a forced call ------------------------------------------------------------------------------
_COMPACT = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


def _call_schema(tool: dict[str, Any], args_key: str) -> dict[str, Any]:
    fn = tool["function"]
    return {"type": "object", "properties": {"name": {"const": fn["name"]}, args_key: fn["parameters"]},
            "required": ["name", args_key], "additionalProperties": False}


def _json(schema: dict[str, Any]) -> str:
    return "%json" + json.dumps(dict(schema, **{"x-guidance": _COMPACT}), ensure_ascii=False)


def forced_call_grammar(syntax: ToolSyntax, tools: list[dict[str, Any]], parallel: bool,
                        special_id: Callable[[str], int | None]) -> str:
    """A Lark grammar whose every sentence is a valid call (or, when ``parallel``, calls) to one of
    ``tools`` in ``syntax``. ``special_id`` maps a marker text to its control-token id when the
    vocabulary has one (``[TOOL_CALLS]`` is a single control token in Mistral's)."""

    def marker(text: str) -> str:
        tid = special_id(text)
        return f"<[{tid}]>" if tid is not None else json.dumps(text)

    many = parallel and syntax.parallel
    if syntax.name == "mistral-v11":
        options = " | ".join(f"{json.dumps(t['function']['name'])} {marker('[ARGS]')} {_json(t['function']['parameters'])}"
                             for t in tools)
        return f"start: call{'+' if many else ''}\ncall: {marker(syntax.open)} ({options})\n"
    one = {"oneOf": [_call_schema(t, syntax.args_key) for t in tools]} if len(tools) > 1 else _call_schema(tools[0], syntax.args_key)
    if syntax.name == "llama3":
        return f"start: {_json(one)}\n"
    if syntax.name == "mistral":
        array = {"type": "array", "items": one, "minItems": 1, **({} if many else {"maxItems": 1})}
        return f"start: {marker(syntax.open)} {_json(array)}\n"
    block = f'{marker(syntax.open)} "\\n" {_json(one)} "\\n" {marker(syntax.close)}'
    more = ' ("\\n" call)*' if many else ""
    return f"start: call{more}\ncall: {block}\n"
