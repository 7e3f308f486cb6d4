"""Model listing and the admin routes that load, unload and reload models.

The list is ``/v1/models`` (:mod:`.routes_openai`, with llama.cpp's router ``status``) and Ollama's
``/api/tags`` shape here. The admin routes take the ``--admin-password`` as a Bearer key: llama.cpp's
router ``POST /models/load`` / ``/models/unload`` (``{"model": name}``), our ``/models/reload``, and
koboldcpp's ``/api/admin/list_options`` and ``/api/admin/reload_config`` (``{"filename": name}``:
load that model and make it the default, as koboldcpp's admin reload switches its one model).
"""

from __future__ import annotations

import datetime

from aiohttp import web

from .errors import ApiError
from .framework import Route, ServerState, json_response, read_json
from .models import ModelEntry

ADMIN = (401, 403, 409)


def _name(body: object, key: str) -> str:
    name = body.get(key) if isinstance(body, dict) else None
    if not isinstance(name, str) or not name:
        raise ApiError(400, f"'{key}' (the model's name) is required", param=key)
    return name


def _answer(entry: ModelEntry) -> web.Response:
    return json_response({"success": True, "model": entry.id, "status": {"value": entry.status}})


async def tags(state: ServerState, request: web.Request) -> web.Response:
    """Ollama's model list (``/api/tags``), which some front-ends read."""
    out = []
    for m in state.models.describe():
        modified = datetime.datetime.fromtimestamp(m.get("modified", 0), datetime.timezone.utc).isoformat()
        out.append({"name": m["name"], "model": m["name"], "modified_at": modified, "size": m.get("size", 0),
                    "details": {"format": m["path"].rsplit(".", 1)[-1], "status": m["status"]}})
    return json_response({"models": out})


async def load(state: ServerState, request: web.Request) -> web.Response:
    state.admin(request)
    return _answer(await state.models.load(_name(await read_json(request, state), "model")))


async def unload(state: ServerState, request: web.Request) -> web.Response:
    state.admin(request)
    return _answer(await state.models.unload(_name(await read_json(request, state), "model")))


async def reload(state: ServerState, request: web.Request) -> web.Response:
    state.admin(request)
    return _answer(await state.models.reload(_name(await read_json(request, state), "model")))


async def kobold_list_options(state: ServerState, request: web.Request) -> web.Response:
    state.admin(request)
    return json_response([e.path.name for e in state.models.entries.values()])


async def kobold_reload_config(state: ServerState, request: web.Request) -> web.Response:
    state.admin(request)
    entry = await state.models.load(_name(await read_json(request, state), "filename"))
    state.models.make_default(entry)
    return json_response({"success": True})


def routes() -> list[Route]:
    return [
        Route("GET", "/api/tags", tags, "kobold"),
        Route("POST", "/models/load", load, "llamacpp", statuses=ADMIN),
        Route("POST", "/models/unload", unload, "llamacpp", statuses=ADMIN),
        Route("POST", "/models/reload", reload, "llamacpp", statuses=ADMIN),
        Route("GET", "/api/admin/list_options", kobold_list_options, "kobold", statuses=ADMIN),
        Route("POST", "/api/admin/reload_config", kobold_reload_config, "kobold", statuses=ADMIN),
    ]
