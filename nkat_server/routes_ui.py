"""The built-in chat page at ``/`` and ``/ui``: plain HTML, CSS and JavaScript from ``nkat_server/ui/``
(package data), no build step and nothing fetched from elsewhere.

The page talks to the OpenAI routes (``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``)
like any other client. Its stylesheet and script are inlined into the one HTML answer, so the page is
a single route per path (the OpenAPI document lists ``/`` and ``/ui`` as text/html pages). A
Content-Security-Policy naming the inlined code by hash lets the browser load nothing else and talk to
this server only.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from aiohttp import web

from .framework import Route, ServerState

_CSS_MARK = "<!-- chat.css -->"
_JS_MARK = "<!-- chat.js -->"


@dataclass(frozen=True)
class Page:
    html: str
    csp: str


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


@lru_cache(maxsize=1)
def page() -> Page:
    """index.html with chat.css and chat.js in its place-holders (read once), and its CSP."""
    folder = resources.files(__package__).joinpath("ui")
    html = folder.joinpath("index.html").read_text(encoding="utf-8")
    css = "\n" + folder.joinpath("chat.css").read_text(encoding="utf-8")
    js = "\n" + folder.joinpath("chat.js").read_text(encoding="utf-8")
    if _CSS_MARK not in html or _JS_MARK not in html:
        raise RuntimeError("nkat_server/ui/index.html lost its chat.css / chat.js place-holders")
    if "</script" in js.lower() or "</style" in css.lower():
        raise RuntimeError("chat.js / chat.css must not close their own element")
    csp = (f"default-src 'none'; script-src {_sha256(js)}; style-src {_sha256(css)}; connect-src 'self'; "
           "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'self'")
    return Page(html.replace(_CSS_MARK, f"<style>{css}</style>").replace(_JS_MARK, f"<script>{js}</script>"), csp)


async def index(state: ServerState, request: web.Request) -> web.Response:
    p = page()
    return web.Response(text=p.html, content_type="text/html", charset="utf-8",
                        headers={"Content-Security-Policy": p.csp, "X-Content-Type-Options": "nosniff",
                                 "Referrer-Policy": "no-referrer"})


def routes() -> list[Route]:
    return [Route("GET", "/", index, "llamacpp"), Route("GET", "/ui", index, "llamacpp")]
