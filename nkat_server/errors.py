"""Typed errors → HTTP status and the error body of the route's dialect.

Kobold routes answer ``{"detail": {"msg", "type"}}``, OpenAI routes ``{"error": {"message",
"type", "param", "code"}}``, llama.cpp routes ``{"error": {"code", "message", "type"}}``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from adapters import kobold, llamacpp, openai
from adapters.samplers import compact_json
from nkat_runtime.errors import (
    ChatTemplateError,
    ContextLengthError,
    InvalidRequestError,
    NKATError,
    RequestNotSupportedError,
    ServerBusyError,
    TokenizerError,
)

log = logging.getLogger(__name__)

# kind -> (Kobold type, OpenAI type, llama.cpp type)
_KINDS = {
    "bad_input": ("bad_input", "invalid_request_error", "invalid_request_error"),
    "context": ("bad_input", "invalid_request_error", "exceed_context_size_error"),
    "not_supported": ("not_implemented", "not_supported_error", "not_supported_error"),
    "unauthorized": ("unauthorized", "authentication_error", "authentication_error"),
    "busy": ("service_unavailable", "unavailable_error", "unavailable_error"),
    "not_found": ("not_found", "not_found_error", "not_found_error"),
    "too_large": ("bad_input", "invalid_request_error", "invalid_request_error"),
    "server": ("server_error", "server_error", "server_error"),
}


@dataclass
class ApiError(Exception):
    status: int
    message: str
    kind: str = "bad_input"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message


def classify(exc: BaseException) -> ApiError:
    """Any exception as an ApiError (unexpected ones become a logged 500)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ContextLengthError):
        return ApiError(400, str(exc), "context", exc.param, "context_length_exceeded",
                        extra={"n_prompt_tokens": exc.n_prompt_tokens, "n_ctx": exc.n_ctx})
    if isinstance(exc, RequestNotSupportedError):
        return ApiError(400, str(exc), "not_supported", exc.param, "not_supported")
    if isinstance(exc, InvalidRequestError):
        return ApiError(400, str(exc), "bad_input", exc.param)
    if isinstance(exc, (ChatTemplateError, TokenizerError)):
        return ApiError(400, str(exc), "bad_input")
    if isinstance(exc, ServerBusyError):
        return ApiError(503, str(exc), "busy", headers={"Retry-After": "1"})
    if isinstance(exc, (ValueError, NKATError)):
        return ApiError(400, str(exc), "bad_input")
    log.error("internal error", exc_info=exc)
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server")


def error_payload(dialect: str, err: ApiError) -> dict[str, Any]:
    kobold_type, openai_type, llama_type = _KINDS.get(err.kind, _KINDS["server"])
    if dialect == "openai":
        return openai.error_body(err.message, openai_type, err.param, err.code)
    if dialect == "llamacpp":
        return llamacpp.error_body(err.message, llama_type, err.status, **err.extra)
    return kobold.error_body(err.message, kobold_type, err.status)


def error_response(dialect: str, exc: BaseException) -> web.Response:
    err = classify(exc)
    return web.Response(status=err.status, text=compact_json(error_payload(dialect, err)),
                        content_type="application/json", headers=err.headers)
