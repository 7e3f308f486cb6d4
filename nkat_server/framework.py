"""The framework under the routes: server state and config, the route table and its dispatcher.

The dispatcher does what every route shares: trailing-slash and KoboldCpp-style suffix routing
(``/anything/api/v1/generate`` works), ``OPTIONS``/``HEAD`` → 200, CORS on every response, the
request-size limit, Bearer auth with KoboldCpp's protected/unprotected split (constant-time key
compare), JSON body parsing, and turning any error into the route dialect's error body.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from aiohttp import web

from nkat_runtime import __version__
from nkat_runtime.serve.engine import Engine

from .errors import ApiError, error_response

log = logging.getLogger(__name__)

Handler = Callable[["ServerState", web.Request], Awaitable[web.StreamResponse]]

CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "*",
    "Access-Control-Allow-Headers": "*, Authorization, Content-Type, Accept, apikey, genkey, X-Requested-With, "
                                    "X-Stainless-Lang, X-Stainless-Package-Version, X-Stainless-OS, "
                                    "X-Stainless-Arch, X-Stainless-Runtime, X-Stainless-Runtime-Version, "
                                    "X-Stainless-Retry-Count, X-Stainless-Timeout",
    "Access-Control-Expose-Headers": "X-NKAT-Warning, Retry-After",
}


@dataclass
class ServerConfig:
    password: str | None = None  # Bearer key; None = open server (any Authorization accepted)
    max_body_bytes: int = 32 * 1024 * 1024
    keepalive_seconds: float = 15.0  # SSE comment after this long without output (OpenAI streams)
    body_timeout_seconds: float = 60.0  # the whole request body must arrive within this (slow uploads: 408)
    pooling: str = "mean"  # how embeddings pool the tokens' hidden states: mean or last


@dataclass
class ServerState:
    engine: Engine
    config: ServerConfig
    model_name: str  # the model file's base name
    started: float = field(default_factory=time.time)
    version: str = __version__

    @property
    def model_id(self) -> str:
        return f"koboldcpp/{self.model_name}"

    def authorised(self, request: web.Request) -> bool:
        if not self.config.password:
            return True
        scheme, _, key = request.headers.get("Authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(key.strip().encode("utf-8"), self.config.password.encode("utf-8"))


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    dialect: str  # "kobold" | "openai" | "llamacpp": the shape of its error bodies
    protected: bool = False


class Router:
    def __init__(self, routes: list[Route]) -> None:
        self.exact: dict[tuple[str, str], Route] = {}
        self.paths: dict[str, list[Route]] = {}
        for r in routes:
            self.exact[(r.method, r.path)] = r
            self.paths.setdefault(r.path, []).append(r)
        # KoboldCpp matches its API routes by suffix: longest first
        self.suffixes = sorted((p for p in self.paths if p.startswith(("/api/", "/v1/"))), key=len, reverse=True)

    def find(self, method: str, path: str) -> tuple[Route | None, str | None]:
        """(route, None), or (None, the path that exists for another method) or (None, None)."""
        if path not in self.paths:
            path = next((p for p in self.suffixes if path.endswith(p)), path)
        route = self.exact.get((method, path))
        if route is not None:
            return route, None
        return None, path if path in self.paths else None


def dialect_of(path: str) -> str:
    if path.startswith("/api/") or path == "/api":
        return "kobold"
    if path.startswith("/v1/") or path in ("/completions", "/chat/completions", "/models"):
        return "openai"
    return "llamacpp"


async def read_json(request: web.Request, state: ServerState, required: bool = True) -> Any:
    """The body as JSON: None when empty (and not ``required``); 400 on bad JSON, 413 when too big."""
    limit = state.config.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    try:
        raw = await asyncio.wait_for(request.read(), state.config.body_timeout_seconds)
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(limit) from None
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {state.config.body_timeout_seconds:g} s",
                       "timeout") from None
    if not raw.strip():
        if required:
            raise ApiError(400, "the request body is empty: a JSON object is expected")
        return None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, f"Error parsing input: the body is not valid JSON ({exc})") from None


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"Payload is too big. Max payload size is {limit // (1024 * 1024)}MB.", "too_large")


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=json.dumps(obj, separators=(",", ":")),
                        content_type="application/json", headers=headers)


def make_dispatcher(state: ServerState, router: Router) -> Handler:
    async def dispatch(request: web.Request) -> web.StreamResponse:
        path = request.path.rstrip("/") or "/"
        if request.method in ("OPTIONS", "HEAD"):
            return web.Response(status=200)
        route, other = router.find(request.method, path)
        dialect = route.dialect if route else dialect_of(path)
        try:
            if route is None:
                if other is not None:
                    raise ApiError(405, f"{request.method} is not allowed on {other}", "not_found")
                raise ApiError(404, f"Error: HTTP Server is running, but this endpoint does not exist: "
                                    f"{request.method} {request.path}", "not_found")
            if request.content_length is not None and request.content_length > state.config.max_body_bytes:
                raise _too_large(state.config.max_body_bytes)
            if route.protected and not state.authorised(request):
                raise ApiError(401, "Authentication key is missing or invalid.", "unauthorized",
                               headers={"WWW-Authenticate": "Bearer"})
            return await route.handler(state, request)
        except Exception as exc:  # noqa: BLE001 - the edge: every error becomes a JSON body
            return error_response(dialect, exc)

    return dispatch


async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    for k, v in CORS_HEADERS.items():
        response.headers.setdefault(k, v)
    response.headers.setdefault("Cache-Control", "no-store")
    response.headers["Server"] = f"NKAT/{__version__}"
