"""llama.cpp server's native dialect: ``/completion``, ``/tokenize``, ``/detokenize``, ``/props``."""

from __future__ import annotations

from typing import Any

from nkat_runtime.errors import InvalidRequestError
from nkat_runtime.request import Choice, GenerationOutcome, GenerationRequest, TokenLogprob
from nkat_runtime.sampling.params import REP_PEN, TEMPERATURE, TOP_K, TOP_P, TYPICAL, SamplingParams

from .fields import Fields
from .samplers import LLAMACPP_DEFAULTS, read_common, read_length

_SAMPLER_NAMES = {"top_k": TOP_K, "typ_p": TYPICAL, "typical_p": TYPICAL, "top_p": TOP_P, "min_p": TOP_P,
                  "temperature": TEMPERATURE, "penalties": REP_PEN}
_SAMPLER_CHARS = {"k": TOP_K, "y": TYPICAL, "p": TOP_P, "m": TOP_P, "t": TEMPERATURE}
STOP_TYPES = {"eos": "eos", "stop_string": "word", "length": "limit", "abort": "none"}


def _order(f: Fields) -> tuple[int, ...] | None:
    found = f.raw("samplers")
    if found is None:
        return None
    names = found[1]
    if isinstance(names, str):
        ids = [_SAMPLER_CHARS[c] for c in names if c in _SAMPLER_CHARS]
    elif isinstance(names, list) and all(isinstance(n, str) for n in names):
        ids = [_SAMPLER_NAMES[n] for n in names if n in _SAMPLER_NAMES]
    else:
        raise InvalidRequestError("'samplers' must be a list of sampler names", "samplers")
    order = [REP_PEN] + [s for i, s in enumerate(ids) if s not in ids[:i] and s != REP_PEN]
    return tuple(order)


def _prompts(value: Any) -> list[str | list[int]]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(x, int) and not isinstance(x, bool) for x in value):
            return [list(value)]
        if all(isinstance(x, str) for x in value):
            return list(value)
        if all(isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x) for x in value):
            return [list(x) for x in value]
    raise InvalidRequestError("'prompt' must be a string, token ids, or a list of either "
                              "(mixed text/token prompts are not supported)", "prompt")


def parse_completion(body: Any) -> tuple[GenerationRequest, bool, bool]:
    """(request, stream, return_tokens) of a ``/completion`` body."""
    f = Fields(body)
    req = GenerationRequest(dialect="llamacpp", overflow="error")
    read_common(f, req, LLAMACPP_DEFAULTS)
    order = _order(f)
    if order is not None:
        req.sampling.sampler_order = order
    if f.integer("repeat_last_n") == -1:
        req.sampling.repeat_last_n = -1
    if f.integer("dry_penalty_last_n") == 0:  # llama.cpp: 0 disables, -1 = the whole context
        req.sampling.dry_multiplier = 0.0
    if not f.has("prompt"):
        raise InvalidRequestError("'prompt' is required", "prompt")
    req.prompts = _prompts(f.body["prompt"])
    req.max_tokens = read_length(f, "n_predict", "max_tokens", default=-1, allow_unlimited=True)
    req.cache_prompt = f.boolean("cache_prompt", default=True)
    seed = f.integer("seed")
    req.seed = seed if seed is not None and 0 <= seed < 0xFFFFFFFF else None
    n_probs = f.integer("n_probs", default=0)
    req.logprobs = min(max(n_probs, 0), 20) if n_probs > 0 else None
    return req, f.boolean("stream"), f.boolean("return_tokens")


def parse_infill(body: Any) -> tuple[str, str, list[tuple[str, str]], str]:
    """(input_prefix, input_suffix, input_extra as (filename, text), prompt) of an ``/infill`` body;
    the sampling fields are :func:`parse_completion`'s."""
    f = Fields(body)
    for name in ("input_prefix", "input_suffix", "prompt"):
        if not isinstance(f.body.get(name) or "", str):
            raise InvalidRequestError(f"'{name}' must be a string", name)
    extra = f.body.get("input_extra") or []
    if not isinstance(extra, list) or not all(isinstance(c, dict) and isinstance(c.get("text", ""), str)
                                              and isinstance(c.get("filename", ""), str) for c in extra):
        raise InvalidRequestError("'input_extra' must be a list of {\"filename\": ..., \"text\": ...} objects",
                                  "input_extra")
    return (f.string("input_prefix"), f.string("input_suffix"),
            [(c.get("filename") or "", c.get("text") or "") for c in extra], f.string("prompt"))


def _probs(entries: list[TokenLogprob] | None) -> list[dict[str, Any]] | None:
    if entries is None:
        return None

    def one(e: TokenLogprob) -> dict[str, Any]:
        return {"id": e.token_id, "token": e.token, "logprob": e.logprob, "bytes": e.bytes}

    return [dict(one(e), top_logprobs=[one(t) for t in e.top]) for e in entries]


def generation_settings(p: SamplingParams, n_ctx: int, model: str) -> dict[str, Any]:
    return {"n_ctx": n_ctx, "model": model, "params": {
        "temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p, "min_p": p.min_p,
        "typical_p": p.typical, "repeat_penalty": p.repeat_penalty, "repeat_last_n": p.repeat_last_n,
        "presence_penalty": p.presence_penalty, "frequency_penalty": p.frequency_penalty,
        "mirostat": p.mirostat, "mirostat_tau": p.mirostat_tau, "mirostat_eta": p.mirostat_eta,
        "dry_multiplier": p.dry_multiplier, "dry_base": p.dry_base, "dry_allowed_length": p.dry_allowed_length,
        "xtc_probability": p.xtc_probability, "xtc_threshold": p.xtc_threshold, "seed": p.seed,
    }}


def completion_result(choice: Choice, outcome: GenerationOutcome, model: str, settings: dict[str, Any],
                      return_tokens: bool) -> dict[str, Any]:
    prompt_ms = outcome.prefill_seconds * 1000
    predicted_ms = outcome.decode_seconds * 1000
    n = choice.completion_tokens
    out = {
        "index": choice.index, "content": choice.text, "tokens": choice.token_ids if return_tokens else [],
        "id_slot": 0, "stop": True, "model": model, "tokens_predicted": n,
        "tokens_evaluated": choice.prompt_tokens, "generation_settings": settings, "prompt": choice.prompt_text,
        "has_new_line": "\n" in choice.text, "truncated": outcome.truncated_tokens > 0,
        "stop_type": STOP_TYPES.get(choice.stop_kind, "none"),
        "stopping_word": choice.stop_string if choice.stop_kind == "stop_string" else "",
        "tokens_cached": choice.cached_tokens,
        "timings": {"prompt_n": choice.prompt_tokens - choice.cached_tokens, "prompt_ms": round(prompt_ms, 3),
                    "predicted_n": n, "predicted_ms": round(predicted_ms, 3),
                    "predicted_per_second": round(n / outcome.decode_seconds, 3) if outcome.decode_seconds else 0.0},
    }
    if choice.logprobs is not None:
        out["completion_probabilities"] = _probs(choice.logprobs)
    if outcome.warnings:
        out["warnings"] = outcome.warnings
    return out


def stream_piece(index: int, text: str) -> dict[str, Any]:
    return {"index": index, "content": text, "tokens": [], "stop": False, "id_slot": 0}


def parse_tokenize(body: Any) -> tuple[str, bool, bool, bool]:
    """(content, add_special, parse_special, with_pieces)."""
    f = Fields(body)
    if not isinstance(f.body.get("content", ""), str):
        raise InvalidRequestError("'content' must be a string", "content")
    return (f.string("content"), f.boolean("add_special"), f.boolean("parse_special", default=True),
            f.boolean("with_pieces"))


def token_piece(token_id: int, raw: bytes) -> dict[str, Any]:
    try:
        piece: str | list[int] = raw.decode("utf-8")
    except UnicodeDecodeError:
        piece = list(raw)
    return {"id": token_id, "piece": piece}


def parse_detokenize(body: Any) -> list[int]:
    ids = Fields(body).int_list("tokens")
    return ids if ids is not None else []


def error_body(message: str, kind: str, status: int, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": status, "message": message, "type": kind, **extra}}
