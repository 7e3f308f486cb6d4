"""Running one request on the engine from a handler: prepare off the loop, queue, wait or stream,
and abort when the client goes away (a cancelled handler or a failed write)."""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

from aiohttp import web

from nkat_runtime.errors import ServerBusyError
from nkat_runtime.request import GenerationEvent, GenerationOutcome, GenerationRequest
from nkat_runtime.serve.engine import Engine, JobHandle

from .sse import ClientGone, SSEWriter

log = logging.getLogger(__name__)


async def submit(engine: Engine, greq: GenerationRequest) -> JobHandle:
    """Tokenise and fit in a worker thread (long prompts take a while), then queue (503 when full)."""
    if engine.is_full():  # fail fast, before tokenising
        raise ServerBusyError("Server is busy; please try again later.")
    prepared = await asyncio.to_thread(engine.prepare, greq)
    return engine.submit(prepared)


def warning_headers(handle: JobHandle) -> dict[str, str]:
    warnings = handle.prepared.warnings
    if not warnings:
        return {}
    text = " | ".join(warnings).encode("ascii", errors="replace").decode("ascii")
    return {"X-NKAT-Warning": text.replace("\n", " ")}


async def run_to_end(handle: JobHandle) -> GenerationOutcome:
    """The whole outcome; if the handler is cancelled (client gone), the job is aborted."""
    finished = False
    try:
        outcome = await handle.result()
        finished = True
        return outcome
    finally:
        if not finished:
            handle.cancel()
            log.info("job %s aborted: the client went away", handle.id[:8])


async def events_with_keepalive(handle: JobHandle, writer: SSEWriter | None,
                                interval: float) -> AsyncIterator[GenerationEvent]:
    """The job's events; while none comes for ``interval`` seconds, an SSE comment goes out
    (only when ``writer`` is given: Kobold streams must not carry anything but events)."""
    events = handle.events().__aiter__()
    pending: asyncio.Task | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(events.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=interval if writer is not None else None)
            if not done:
                assert writer is not None
                await writer.comment()
                continue
            try:
                event = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield event
    finally:
        if pending is not None and not pending.done():
            pending.cancel()


async def stream_guard(handle: JobHandle, writer: SSEWriter, body: AsyncIterator[None]) -> web.StreamResponse:
    """Drive ``body`` (which writes the stream); abort the job if the client goes away."""
    finished = False
    try:
        async for _ in body:
            pass
        finished = True
    except ClientGone:
        pass
    finally:
        if not finished:
            handle.cancel()
            log.info("job %s aborted: the client closed the stream", handle.id[:8])
    return await writer.close()
