"""The aiohttp application: the three dialects' routes (and ``/openapi.json``) assembled behind one
dispatcher (:mod:`.framework`)."""

from __future__ import annotations

import asyncio
import logging
from typing import Sequence

from aiohttp import web

from . import routes_embeddings, routes_kobold, routes_llamacpp, routes_models, routes_openai, routes_slots, routes_ui
from .errors import ApiError
from .framework import Route, Router, ServerState, json_response, make_dispatcher, on_prepare
from .metrics import metrics_route
from .openapi import document

log = logging.getLogger(__name__)


def create_app(state: ServerState, preload: Sequence[str] = ()) -> web.Application:
    """The application; ``preload`` names models to load in the background once it serves."""
    routes = (routes_kobold.routes() + routes_openai.routes() + routes_llamacpp.routes() + routes_embeddings.routes()
              + routes_models.routes() + routes_slots.routes() + routes_ui.routes())

    async def openapi(state: ServerState, request: web.Request) -> web.Response:
        return json_response(document(routes, state.version))

    routes.append(Route("GET", "/openapi.json", openapi, "llamacpp"))
    routes.append(Route("GET", "/metrics", metrics_route, "llamacpp"))
    dispatch = make_dispatcher(state, Router(routes))
    # the body limit is enforced in read_json; aiohttp's own cap is a backstop for chunked uploads
    app = web.Application(client_max_size=state.config.max_body_bytes + 1)
    app["state"] = state

    async def handler(request: web.Request) -> web.StreamResponse:
        return await dispatch(request)

    app.router.add_route("*", "/{tail:.*}", handler)
    app.on_response_prepare.append(on_prepare)

    async def load_the_others(_: web.Application) -> None:
        for name in preload:
            try:
                await state.models.load(name)
            except ApiError as exc:  # the listing shows it as failed; the others keep serving
                log.error("%s", exc.message)

    async def start_loading(app: web.Application) -> None:
        app["preload"] = asyncio.ensure_future(load_the_others(app))

    async def shutdown(app: web.Application) -> None:
        app["preload"].cancel()
        await state.models.close()

    app.on_startup.append(start_loading)
    app.on_shutdown.append(shutdown)
    return app
