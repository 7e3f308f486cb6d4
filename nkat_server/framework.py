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
from pathlib import Path
from typing import Any, AsyncContextManager, Awaitable, Callable

from aiohttp import web

from nkat_runtime import __version__

from .errors import ApiError, error_response
from .metrics import Metrics
from .models import ModelEntry, ModelSet

log = logging.getLogger(__name__)

Handler = Callable[["ServerState", web.Request], Awaitable[web.StreamResponse]]

CORS_HEADERS = {
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
    admin_password: str | None = None  # Bearer key of the admin routes; None = admin routes refused
    slot_save_path: Path | None = None  # folder of /slots/{id}?action=save|restore files; None = refused
    cors_origins: tuple[str, ...] = ("*",)  # origins browsers may call from ("*" = any, as KoboldCpp)


@dataclass
class ServerState:
    models: ModelSet
    config: ServerConfig
    started: float = field(default_factory=time.time)
    version: str = __version__
    metrics: Metrics | None = None  # --metrics

    def use(self, name: str | None = None) -> AsyncContextManager[ModelEntry]:
        """The model a request names (None: the default), loaded and held while the block runs."""
        return self.models.use(name)

    def authorised(self, request: web.Request) -> bool:
        return _bearer_matches(request, self.config.password)

    def admin(self, request: web.Request) -> None:
        """Raise unless the request carries the admin password (403 when the server has none)."""
        if not self.config.admin_password:
            raise ApiError(403, "the admin routes are off: start the server with --admin-password", "unauthorized")
        if not _bearer_matches(request, self.config.admin_password):
            raise ApiError(401, "Authentication key for the admin routes is missing or invalid.", "unauthorized",
                           headers={"WWW-Authenticate": "Bearer"})


def _bearer_matches(request: web.Request, secret: str | None) -> bool:
    if not secret:
        return True
    scheme, _, key = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(key.strip().encode("utf-8"), secret.encode("utf-8"))


def model_field(body: Any, query: Any = None) -> str | None:
    """The ``model`` a request names: the JSON body's field, else ``?model=`` (llama.cpp's GET routes)."""
    name = body.get("model") if isinstance(body, dict) else None
    if name is None and query is not None:
        name = query.get("model")
    if name is not None and not isinstance(name, str):
        raise ApiError(400, "'model' must be a string", param="model")
    return name or None


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    dialect: str  # "kobold" | "openai" | "llamacpp": the shape of its error bodies
    protected: bool = False
    statuses: tuple[int, ...] = ()  # answers beyond the common ones (openapi.statuses), e.g. 403 on admin routes


class Router:
    """Exact paths, KoboldCpp's suffix matching, and paths ending in one ``{name}`` segment
    (``/slots/{id}``: the handler reads the segment with :func:`last_segment`)."""

    def __init__(self, routes: list[Route]) -> None:
        self.exact: dict[tuple[str, str], Route] = {}
        self.paths: dict[str, list[Route]] = {}
        for r in routes:
            self.exact[(r.method, r.path)] = r
            self.paths.setdefault(r.path, []).append(r)
        # KoboldCpp matches its API routes by suffix: longest first
        self.suffixes = sorted((p for p in self.paths if p.startswith(("/api/", "/v1/"))), key=len, reverse=True)
        self.patterns = [p for p in self.paths if p.endswith("}") and "/{" in p]

    def find(self, method: str, path: str) -> tuple[Route | None, str | None]:
        """(route, None), or (None, the path that exists for another method) or (None, None)."""
        if path not in self.paths:
            head, _, tail = path.rpartition("/")
            pattern = next((p for p in self.patterns if tail and p.rpartition("/")[0] == head), None)
            path = pattern or next((p for p in self.suffixes if path.endswith(p)), path)
        route = self.exact.get((method, path))
        if route is not None:
            return route, None
        return None, path if path in self.paths else None


def last_segment(request: web.Request) -> str:
    """The ``{name}`` part of a pattern route's path."""
    return request.path.rstrip("/").rpartition("/")[2]


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
        response = await _answer(request, route, other, dialect)
        if state.metrics is not None:
            state.metrics.request(route, response.status)
        return response

    async def _answer(request: web.Request, route: Route | None, other: str | None,
                      dialect: str) -> web.StreamResponse:
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
    origins = request.app["state"].config.cors_origins
    origin = request.headers.get("Origin")
    if "*" in origins:
        response.headers.setdefault("Access-Control-Allow-Origin", "*")
    elif origin and origin in origins:
        response.headers.setdefault("Access-Control-Allow-Origin", origin)
    if "*" not in origins:
        response.headers.add("Vary", "Origin")
    for k, v in CORS_HEADERS.items():
        response.headers.setdefault(k, v)
    response.headers.setdefault("Cache-Control", "no-store")
    response.headers["Server"] = f"NKAT/{__version__}"
