"""Server-sent events, written exactly as the clients parse them.

- Kobold: ``event: message\\ndata: {json}\\n\\n`` (KoboldAI Lite matches this with a strict regex);
  no end marker, the response just ends.
- OpenAI: ``data: {json}\\n\\n``, ending with ``data: [DONE]\\n\\n``.
- llama.cpp: ``data: {json}\\n\\n``, no ``[DONE]``.

JSON is compact, one line, non-ASCII escaped (so a frame is always a single ``data:`` line).
A failed write means the client is gone: :class:`ClientGone` is raised, and the caller aborts.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web


class ClientGone(Exception):
    """The client closed the connection while we were streaming to it."""


class SSEWriter:
    def __init__(self, request: web.Request, headers: dict[str, str] | None = None) -> None:
        self.request = request
        self.response = web.StreamResponse(status=200, headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no",
            **(headers or {}),
        })
        self.opened = False

    async def open(self) -> None:
        if not self.opened:
            await self.response.prepare(self.request)
            self.opened = True

    async def _write(self, text: str) -> None:
        await self.open()
        transport = self.request.transport
        if transport is None or transport.is_closing():
            raise ClientGone()
        try:
            await self.response.write(text.encode("utf-8"))
        except (ConnectionError, RuntimeError) as exc:  # reset / "cannot write to closing transport"
            raise ClientGone() from exc

    async def data(self, obj: Any) -> None:
        await self._write(f"data: {json.dumps(obj, separators=(',', ':'))}\n\n")

    async def event(self, name: str, obj: Any) -> None:
        await self._write(f"event: {name}\ndata: {json.dumps(obj, separators=(',', ':'))}\n\n")

    async def done(self) -> None:
        await self._write("data: [DONE]\n\n")

    async def comment(self, text: str = "keep-alive") -> None:
        await self._write(f": {text}\n\n")

    async def close(self) -> web.StreamResponse:
        await self.open()
        try:
            await self.response.write_eof()
        except (ConnectionError, RuntimeError):
            pass
        return self.response
