"""KoboldAI / KoboldCpp dialect: ``/api/v1/generate``, ``/api/extra/*`` JSON ⇄ request types.

Deliberate differences from KoboldCpp (see docs/server.md): a matched stop sequence reports
``finish_reason: "stop"`` (KoboldCpp says "length"), bad input is a 400 (KoboldCpp: 500), and a
clamped ``max_length`` or a cut prompt is reported in ``warnings`` instead of happening silently.
"""

from __future__ import annotations

import time
from typing import Any

from nkat_runtime.errors import InvalidRequestError
from nkat_runtime.request import Choice, EngineStats, GenerationOutcome, GenerationRequest, TokenLogprob

from .fields import Fields
from .samplers import KOBOLD_DEFAULTS, read_common, read_length

KOBOLDCPP_VERSION = "1.76"  # the KoboldCpp release whose generation features we implement
KOBOLD_API_VERSION = "1.2.5"  # KoboldAI United API version (stop_sequence, use_default_badwordsids)
LOGPROB_ALTERNATIVES = 5


def model_result(name: str, authorised: bool) -> dict[str, Any]:
    return {"result": f"koboldcpp/{name}" if authorised else "koboldcpp/protected-model"}


def version_info(protected: bool, nkat_version: str) -> dict[str, Any]:
    return {
        "result": "KoboldCpp", "version": KOBOLDCPP_VERSION, "protected": protected, "llm": True,
        "txt2img": False, "vision": False, "transcribe": False, "multiplayer": False, "websearch": False,
        "tts": False, "embeddings": False, "savedata": False, "admin": 0, "guidance": False, "audio": False,
        "server": "nkat", "nkat_version": nkat_version,
    }


def parse_generate(body: Any) -> GenerationRequest:
    """A ``/api/v1/generate`` or ``/api/extra/generate/stream`` body."""
    f = Fields(body)
    req = GenerationRequest(dialect="kobold", overflow="truncate")
    read_common(f, req, KOBOLD_DEFAULTS)
    req.prompts = [f.string("prompt")]
    req.max_tokens = read_length(f, "max_length")
    seed = f.integer("sampler_seed", "seed")
    req.seed = seed if seed is not None and 0 < seed < 0xFFFFFFFF else None
    req.logprobs = LOGPROB_ALTERNATIVES if f.boolean("logprobs") else None
    return req


def finish_reason(choice: Choice) -> str:
    return "length" if choice.stop_kind == "length" else "stop"


def logprobs_object(entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
    """KoboldCpp's logprobs object: OpenAI-chat ``content`` plus the legacy parallel arrays."""
    if entries is None:
        return None

    def one(e: TokenLogprob) -> dict[str, Any]:
        return {"token": e.token, "logprob": e.logprob, "bytes": e.bytes}

    return {
        "content": [dict(one(e), top_logprobs=[one(t) for t in e.top]) for e in entries],
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{t.token: t.logprob for t in e.top} for e in entries],
        "text_offset": [e.text_offset for e in entries],
    }


def generate_response(outcome: GenerationOutcome) -> dict[str, Any]:
    c = outcome.choices[0]
    result = {"text": c.text, "finish_reason": finish_reason(c), "logprobs": logprobs_object(c.logprobs),
              "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens}
    out: dict[str, Any] = {"results": [result]}
    if outcome.warnings:
        out["warnings"] = outcome.warnings
    return out


def stream_piece(text: str) -> dict[str, Any]:
    return {"token": text, "finish_reason": None}


def stream_end(choice: Choice) -> dict[str, Any]:
    return {"token": "", "finish_reason": finish_reason(choice)}


def check_response(text: str) -> dict[str, Any]:
    return {"results": [{"text": text}]}


def abort_response(success: bool, done: bool) -> dict[str, Any]:
    return {"success": "true" if success else "false", "done": "true" if done else "false"}


def parse_genkey(body: Any) -> str:
    """The ``genkey`` of a check/abort body; a missing or empty body means no key."""
    if body is None or body == {}:
        return ""
    return Fields(body).string("genkey")


def parse_tokencount(body: Any) -> tuple[str, bool]:
    f = Fields(body)
    if not isinstance(f.body.get("prompt", ""), str):
        raise InvalidRequestError("'prompt' must be a string", "prompt")
    return f.string("prompt"), f.boolean("special", default=True)


def parse_detokenize(body: Any) -> list[int]:
    f = Fields(body)
    ids = f.int_list("ids")
    if ids is None:
        raise InvalidRequestError("'ids' (a list of token ids) is required", "ids")
    if len(ids) > 65535:
        raise InvalidRequestError("at most 65535 ids", "ids")
    return ids


def perf(stats: EngineStats) -> dict[str, Any]:
    now = time.time()
    proc, ev = stats.last_process_seconds, stats.last_eval_seconds
    return {
        "last_process": round(proc, 3), "last_eval": round(ev, 3), "last_token_count": stats.last_token_count,
        "last_input_count": stats.last_input_count, "last_seed": stats.last_seed,
        "last_process_time": round(proc, 3), "last_eval_time": round(ev, 3),
        "last_process_speed": round(stats.last_input_count / proc, 2) if proc else 0.0,
        "last_eval_speed": round(stats.last_token_count / ev, 2) if ev else 0.0,
        "total_gens": stats.total_gens, "stop_reason": stats.stop_reason_code if stats.total_gens else -1,
        "total_img_gens": 0, "total_tts_gens": 0, "total_transcribe_gens": 0, "queue": stats.queued,
        "idle": 0 if stats.busy else 1, "hordeexitcounter": 0, "uptime": round(now - stats.started, 1),
        "idletime": 0.0 if stats.busy else round(now - stats.last_end, 1), "quiet": False,
    }


def error_body(message: str, kind: str = "bad_input", status: int = 400) -> dict[str, Any]:
    detail: dict[str, Any] = {"msg": message, "type": kind}
    if status == 401:
        detail["error"] = "Unauthorized"
    return {"detail": detail}
