"""OpenAI dialect: ``/v1/completions`` and ``/v1/chat/completions`` JSON ⇄ request types.

Every Kobold field is honoured here too (SillyTavern's KoboldCpp mode sends its whole sampler
set to ``/v1/completions``); OpenAI names win where both exist (``max_tokens``, ``stop``, ``seed``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from nkat_runtime.errors import InvalidRequestError, RequestNotSupportedError
from nkat_runtime.request import ChatOptions, Choice, GenerationOutcome, GenerationRequest, TokenLogprob
from nkat_runtime.sampling.params import GrammarSpec
from nkat_runtime.text.chat_output import Delta, ParsedMessage, reasoning_format
from nkat_runtime.text.tool_syntax import check_tools

from .fields import Fields
from .samplers import LLAMACPP_DEFAULTS, json_schema_text, read_common, read_length, read_n

MAX_COMPLETION_LOGPROBS = 5
MAX_CHAT_TOP_LOGPROBS = 20
SYSTEM_FINGERPRINT = "fp_nkat"


@dataclass
class StreamOptions:
    stream: bool = False
    include_usage: bool = False


def _stream_options(f: Fields) -> StreamOptions:
    opts = StreamOptions(stream=f.boolean("stream"))
    so = f.raw("stream_options")
    if so is not None:
        if not isinstance(so[1], dict):
            raise InvalidRequestError("'stream_options' must be an object", "stream_options")
        opts.include_usage = Fields(so[1]).boolean("include_usage")
    return opts


def _common(f: Fields, req: GenerationRequest) -> None:
    read_common(f, req, LLAMACPP_DEFAULTS)
    req.max_tokens = read_length(f, "max_completion_tokens", "max_tokens", "max_length", "max_new_tokens",
                                 "n_predict", "num_predict")
    req.n = read_n(f)
    if f.has("seed"):
        seed = f.integer("seed")
        req.seed = seed if seed is not None and seed >= 0 else None
    else:
        seed = f.integer("sampler_seed")
        req.seed = seed if seed is not None and 0 < seed < 0xFFFFFFFF else None
    if f.integer("best_of", default=1) not in (1, req.n):
        req.warnings.append("best_of is not supported: ignored")
    read_response_format(f, req)


def read_response_format(f: Fields, req: GenerationRequest) -> None:
    """OpenAI ``response_format``: ``text``, ``json_object`` (any JSON object) or ``json_schema``
    (``{"json_schema": {"name": ..., "schema": {...}, "strict": ...}}``): constrained decoding, so
    the output parses and matches unless the length limit cut it."""
    rf = f.raw("response_format")
    if rf is None or rf[1] is None:
        return
    if not isinstance(rf[1], dict):
        raise InvalidRequestError("'response_format' must be an object", "response_format")
    kind = rf[1].get("type", "text")
    if kind == "text":
        return
    if req.grammar is not None:
        raise InvalidRequestError("give either a grammar / json_schema or a response_format, not both",
                                  "response_format")
    if kind == "json_object":
        req.grammar = GrammarSpec("json_schema", '{"type": "object"}', "response_format")
    elif kind == "json_schema":
        spec = rf[1].get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidRequestError("response_format json_schema needs 'json_schema': {'schema': {...}}",
                                      "response_format")
        req.grammar = GrammarSpec("json_schema", json_schema_text(schema, "response_format"), "response_format")
    else:
        raise InvalidRequestError(f"response_format type {kind!r} is not one of text, json_object, json_schema",
                                  "response_format")


def _prompts(value: Any) -> list[str | list[int]]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(x, str) for x in value):
            return list(value)
        if all(isinstance(x, int) and not isinstance(x, bool) for x in value):
            return [list(value)]
        if all(isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
               for x in value):
            return [list(x) for x in value]
    raise InvalidRequestError("'prompt' must be a string, a list of strings, a list of token ids, "
                              "or a list of token-id lists", "prompt")


def parse_completion(body: Any) -> tuple[GenerationRequest, StreamOptions]:
    f = Fields(body)
    req = GenerationRequest(dialect="openai", overflow="error")
    _common(f, req)
    if not f.has("prompt"):
        raise InvalidRequestError("'prompt' is required", "prompt")
    req.prompts = _prompts(f.body["prompt"])
    req.echo = f.boolean("echo")
    lp = f.raw("logprobs")
    if lp is not None:
        if lp[1] is True:
            req.logprobs = 1
        elif lp[1] is not False:
            n = f.integer("logprobs")
            if n is None or n < 0:
                raise InvalidRequestError("'logprobs' must be an integer >= 0", "logprobs")
            req.logprobs = min(n, MAX_COMPLETION_LOGPROBS)
    if f.string("suffix"):
        req.warnings.append("suffix is not supported: ignored")
    return req, _stream_options(f)


def _message(m: Any, i: int) -> dict[str, Any]:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise InvalidRequestError(f"messages[{i}] must be an object with a 'role' string", "messages")
    out = {k: v for k, v in m.items() if v is not None}
    out["role"] = "system" if m["role"] == "developer" else m["role"]
    content = m.get("content")
    if content is None:
        out["content"] = ""
    elif isinstance(content, list):
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind in ("image_url", "input_audio", "image", "file"):
                raise RequestNotSupportedError(f"messages[{i}]: '{kind}' content is not supported "
                                               "(text-only model)", "messages")
            else:
                raise InvalidRequestError(f"messages[{i}]: content parts must be text parts", "messages")
        out["content"] = "\n".join(texts)
    elif not isinstance(content, str):
        raise InvalidRequestError(f"messages[{i}]: 'content' must be a string or a list of parts", "messages")
    calls = out.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list) or not all(
                isinstance(c, dict) and isinstance(c.get("function"), dict) and isinstance(c["function"].get("name"), str)
                for c in calls):
            raise InvalidRequestError(f"messages[{i}].tool_calls must be a list of "
                                      "{'id', 'type': 'function', 'function': {'name', 'arguments'}}", "messages")
    return out


def read_chat_options(f: Fields) -> ChatOptions:
    """``tools``, ``tool_choice``, ``parallel_tool_calls`` (OpenAI); ``reasoning_format`` and
    ``chat_template_kwargs`` (llama.cpp's server)."""
    opts = ChatOptions()
    tools = f.raw("tools")
    if tools is not None and tools[1] is not None:
        opts.tools = check_tools(tools[1]) or None
    choice = f.body.get("tool_choice")
    if isinstance(choice, dict):
        fn = choice.get("function")
        if choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise InvalidRequestError("tool_choice must be 'auto', 'none', 'required' or "
                                      "{'type': 'function', 'function': {'name': ...}}", "tool_choice")
        opts.tool_choice, opts.tool_name = "function", fn["name"]
    elif choice is not None:
        if choice not in ("auto", "none", "required"):
            raise InvalidRequestError("tool_choice must be 'auto', 'none', 'required' or a named function",
                                      "tool_choice")
        opts.tool_choice = choice
    if opts.tool_choice in ("required", "function") and not opts.tools:
        raise InvalidRequestError(f"tool_choice {opts.tool_name or opts.tool_choice!r} needs 'tools'", "tool_choice")
    if f.has("parallel_tool_calls"):
        opts.parallel_tool_calls = f.boolean("parallel_tool_calls")
    fmt = f.string("reasoning_format")
    if fmt:
        try:
            opts.reasoning_format = reasoning_format(fmt)
        except ValueError as exc:
            raise InvalidRequestError(str(exc), "reasoning_format") from None
    kwargs = f.raw("chat_template_kwargs")
    if kwargs is not None and kwargs[1] is not None:
        if not isinstance(kwargs[1], dict) or not all(isinstance(k, str) for k in kwargs[1]):
            raise InvalidRequestError("'chat_template_kwargs' must be an object", "chat_template_kwargs")
        opts.template_kwargs = dict(kwargs[1])
    return opts


def parse_chat(body: Any) -> tuple[GenerationRequest, StreamOptions]:
    f = Fields(body)
    req = GenerationRequest(dialect="openai", overflow="error")
    _common(f, req)
    messages = f.body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("'messages' must be a non-empty list", "messages")
    req.messages = [_message(m, i) for i, m in enumerate(messages)]
    if f.boolean("logprobs"):
        top = f.integer("top_logprobs", default=0)
        if not 0 <= top <= MAX_CHAT_TOP_LOGPROBS:
            raise InvalidRequestError(f"'top_logprobs' must be in 0..{MAX_CHAT_TOP_LOGPROBS}", "top_logprobs")
        req.logprobs = top
    req.chat = read_chat_options(f)
    if f.has("functions") or f.has("function_call"):
        req.warnings.append("functions / function_call (deprecated by OpenAI) are ignored: send 'tools'")
    return req, _stream_options(f)


# --- responses --------------------------------------------------------------------------------
def finish_reason(choice: Choice, called: bool = False) -> str:
    if choice.stop_kind == "length":
        return "length"
    return "tool_calls" if called else "stop"


def tool_call_json(call: Any) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def usage(outcome: GenerationOutcome) -> dict[str, Any]:
    cached = sum(c.cached_tokens for c in outcome.choices[:1])
    return {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens,
            "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached}}


def completion_logprobs(choice: Choice, echo: bool) -> dict[str, Any] | None:
    if choice.logprobs is None:
        return None
    entries: list[TokenLogprob] = []
    shift = 0
    if echo:
        entries.extend(choice.prompt_logprobs or [])
        shift = len(choice.prompt_text)
    entries.extend(dataclasses.replace(e, text_offset=e.text_offset + shift) for e in choice.logprobs)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [({t.token: t.logprob for t in e.top} if e.logprob is not None else None) for e in entries],
        "text_offset": [e.text_offset for e in entries],
    }


def chat_logprobs(choice: Choice) -> dict[str, Any] | None:
    if choice.logprobs is None:
        return None

    def one(e: TokenLogprob) -> dict[str, Any]:
        return {"token": e.token, "logprob": e.logprob, "bytes": e.bytes}

    return {"content": [dict(one(e), top_logprobs=[one(t) for t in e.top]) for e in choice.logprobs],
            "refusal": None}


def _extras(outcome: GenerationOutcome) -> dict[str, Any]:
    return {"warnings": outcome.warnings} if outcome.warnings else {}


def completion_response(outcome: GenerationOutcome, model: str, echo: bool) -> dict[str, Any]:
    choices = [{"index": c.index, "text": (c.prompt_text if echo else "") + c.text,
                "finish_reason": finish_reason(c), "logprobs": completion_logprobs(c, echo)}
               for c in outcome.choices]
    return {"id": "cmpl-" + outcome.id, "object": "text_completion", "created": outcome.created, "model": model,
            "choices": choices, "usage": usage(outcome), "system_fingerprint": SYSTEM_FINGERPRINT,
            **_extras(outcome)}


def chat_message(msg: ParsedMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": "assistant", "content": msg.content if msg.content or not msg.calls else None,
                           "refusal": None}
    if msg.reasoning:
        out["reasoning_content"] = msg.reasoning
    if msg.calls:
        out["tool_calls"] = [tool_call_json(c) for c in msg.calls]
    return out


def chat_response(outcome: GenerationOutcome, model: str, messages: list[ParsedMessage]) -> dict[str, Any]:
    """``messages``: each choice's reply, split (:class:`~nkat_runtime.text.chat_output.OutputParser`)."""
    choices = [{"index": c.index, "message": chat_message(m), "finish_reason": finish_reason(c, bool(m.calls)),
                "logprobs": chat_logprobs(c)} for c, m in zip(outcome.choices, messages)]
    return {"id": "chatcmpl-" + outcome.id, "object": "chat.completion", "created": outcome.created,
            "model": model, "choices": choices, "usage": usage(outcome), "system_fingerprint": SYSTEM_FINGERPRINT,
            **_extras(outcome)}


class ChunkMaker:
    """Builds the stream chunks of one completion or chat completion (same id on every chunk)."""

    def __init__(self, job_id: str, created: int, model: str, chat: bool, include_usage: bool) -> None:
        self.id = ("chatcmpl-" if chat else "cmpl-") + job_id
        self.created, self.model, self.chat, self.include_usage = created, model, chat, include_usage
        self.object = "chat.completion.chunk" if chat else "text_completion"

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        out = {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
               "system_fingerprint": SYSTEM_FINGERPRINT, "choices": choices}
        if self.include_usage:
            out["usage"] = None
        return out

    def start(self, index: int) -> dict[str, Any] | None:
        """The opening chunk of a chat choice (role only); None for completions."""
        if not self.chat:
            return None
        return self._chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                             "finish_reason": None, "logprobs": None}])

    def text(self, index: int, text: str) -> dict[str, Any]:
        if self.chat:
            return self._chunk([{"index": index, "delta": {"content": text}, "finish_reason": None,
                                 "logprobs": None}])
        return self._chunk([{"index": index, "text": text, "finish_reason": None, "logprobs": None}])

    def delta(self, index: int, delta: Delta) -> list[dict[str, Any]]:
        """Chat chunks for one piece of a split reply: content, reasoning, or a whole tool call
        (its id and name, then its arguments: what the ``openai`` client assembles)."""
        def chunk(d: dict[str, Any]) -> dict[str, Any]:
            return self._chunk([{"index": index, "delta": d, "finish_reason": None, "logprobs": None}])

        out = []
        if delta.reasoning:
            out.append(chunk({"reasoning_content": delta.reasoning}))
        if delta.content:
            out.append(chunk({"content": delta.content}))
        if delta.call is not None:
            c = delta.call
            out.append(chunk({"tool_calls": [{"index": delta.call_index, "id": c.id, "type": "function",
                                              "function": {"name": c.name, "arguments": ""}}]}))
            out.append(chunk({"tool_calls": [{"index": delta.call_index, "function": {"arguments": c.arguments}}]}))
        return out

    def end(self, choice: Choice, echo: bool = False, called: bool = False) -> dict[str, Any]:
        """The last chunk of a choice: the finish reason (and its logprobs, when asked)."""
        if self.chat:
            return self._chunk([{"index": choice.index, "delta": {}, "finish_reason": finish_reason(choice, called),
                                 "logprobs": chat_logprobs(choice)}])
        return self._chunk([{"index": choice.index, "text": "", "finish_reason": finish_reason(choice),
                             "logprobs": completion_logprobs(choice, echo)}])

    def usage(self, outcome: GenerationOutcome) -> dict[str, Any]:
        out = self._chunk([])
        out["usage"] = usage(outcome)
        return out


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def models_list(models: list[dict[str, Any]], created: int) -> dict[str, Any]:
    """OpenAI's model list; each entry also carries llama.cpp's router ``status`` (loaded, loading,
    unloaded, failed) so one listing serves both kinds of client."""
    data = []
    for m in models:
        status: dict[str, Any] = {"value": m["status"]}
        if m.get("error"):
            status["error"] = m["error"]
        data.append({"id": m["id"], "object": "model", "created": created, "owned_by": "koboldcpp",
                     "permission": [], "root": "koboldcpp", "status": status})
    return {"object": "list", "data": data}
