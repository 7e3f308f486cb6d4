"""The aiohttp application: the three dialects' routes (and ``/openapi.json``) assembled behind one
dispatcher (:mod:`.framework`)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from . import routes_embeddings, routes_kobold, routes_llamacpp, routes_openai
from .framework import Route, Router, ServerState, json_response, make_dispatcher, on_prepare
from .openapi import document


def create_app(state: ServerState) -> web.Application:
    routes = routes_kobold.routes() + routes_openai.routes() + routes_llamacpp.routes() + routes_embeddings.routes()

    async def openapi(state: ServerState, request: web.Request) -> web.Response:
        return json_response(document(routes, state.version))

    routes.append(Route("GET", "/openapi.json", openapi, "llamacpp"))
    dispatch = make_dispatcher(state, Router(routes))
    # the body limit is enforced in read_json; aiohttp's own cap is a backstop for chunked uploads
    app = web.Application(client_max_size=state.config.max_body_bytes + 1)
    app["state"] = state

    async def handler(request: web.Request) -> web.StreamResponse:
        return await dispatch(request)

    app.router.add_route("*", "/{tail:.*}", handler)
    app.on_response_prepare.append(on_prepare)

    async def shutdown(_: web.Application) -> None:
        await asyncio.to_thread(state.engine.close)

    app.on_shutdown.append(shutdown)
    return app
