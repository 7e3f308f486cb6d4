"""llama.cpp's slot actions: ``POST /slots/{id}?action=save|restore|erase``, with ``{"filename": ...}``
for save and restore (a plain name in the ``--slot-save-path`` folder). Without that folder every
action is refused (400), as llama.cpp refuses them. The work is
:mod:`nkat_runtime.serve.slot_files`'s: slot state in the engine thread, file I/O in a worker."""

from __future__ import annotations

import logging
import time

from aiohttp import web

from nkat_runtime.serve import slot_files

from .errors import ApiError
from .framework import Route, ServerState, json_response, last_segment, model_field, read_json

log = logging.getLogger(__name__)

ACTIONS = ("save", "restore", "erase")


async def slot_action(state: ServerState, request: web.Request) -> web.Response:
    folder = state.config.slot_save_path
    if folder is None:
        raise ApiError(400, "This server does not support slot actions: start it with --slot-save-path DIR",
                       "not_supported")
    raw = last_segment(request)
    if not (raw.isascii() and raw.isdigit()):
        raise ApiError(400, f"Invalid slot id {raw[:20]!r}: a number is expected", param="id_slot")
    row = int(raw)
    action = request.query.get("action", "")
    if action not in ACTIONS:
        raise ApiError(400, f"Invalid action {action[:20]!r}: use ?action=save, restore or erase", param="action")
    body = await read_json(request, state, required=False)
    if body is not None and not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object such as {\"filename\": \"slot0.bin\"}")
    body = body or {}
    start = time.perf_counter()
    async with state.use(model_field(body, request.query)) as m:
        engine = m.require_engine()
        try:
            if action == "erase":
                return json_response({"id_slot": row, "n_erased": await slot_files.erase_slot(engine, row)})
            path = folder / slot_files.validate_filename(body.get("filename"))
            if action == "save":
                n, written = await slot_files.save(engine, row, path)
                return json_response({"id_slot": row, "filename": path.name, "n_saved": n, "n_written": written,
                                      "timings": {"save_ms": round((time.perf_counter() - start) * 1000, 3)}})
            n, read = await slot_files.restore(engine, row, path)
            return json_response({"id_slot": row, "filename": path.name, "n_restored": n, "n_read": read,
                                  "timings": {"restore_ms": round((time.perf_counter() - start) * 1000, 3)}})
        except slot_files.SlotBusyError as exc:
            raise ApiError(409, str(exc), "busy", headers={"Retry-After": "1"}) from None
        except slot_files.SlotFileMissing as exc:
            raise ApiError(404, str(exc), "not_found") from None
        except OSError as exc:  # the folder went away, the disk is full...
            log.warning("slot %d: %s of %s failed: %s", row, action, body.get("filename"), exc)
            raise ApiError(507, f"the slot file could not be {'written' if action == 'save' else 'read'}: "
                                f"{exc.strerror or exc}", "server") from None


def routes() -> list[Route]:
    return [Route("POST", "/slots/{id}", slot_action, "llamacpp", protected=True, statuses=(409, 507))]
