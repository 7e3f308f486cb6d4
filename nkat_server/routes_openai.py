"""OpenAI routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (and the exact
``/models``, ``/completions``, ``/chat/completions`` aliases KoboldCpp also serves)."""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

from aiohttp import web

from adapters import openai
from nkat_runtime.request import GenerationRequest
from nkat_runtime.text.chat_output import Delta, OutputFormat, OutputParser

from .errors import classify, error_payload
from .framework import Route, ServerState, json_response, model_field, read_json
from .jobs import events_with_keepalive, run_to_end, stream_guard, submit, warning_headers
from .models import ModelEntry
from .sse import SSEWriter


async def models(state: ServerState, request: web.Request) -> web.Response:
    return json_response(openai.models_list(state.models.describe(), int(state.started)))


async def completions(state: ServerState, request: web.Request) -> web.StreamResponse:
    body = await read_json(request, state)
    greq, opts = openai.parse_completion(body)
    async with state.use(model_field(body)) as model:
        return await _serve(state, model, request, greq, opts, chat=False)


async def chat_completions(state: ServerState, request: web.Request) -> web.StreamResponse:
    body = await read_json(request, state)
    greq, opts = openai.parse_chat(body)
    async with state.use(model_field(body)) as model:
        return await _serve(state, model, request, greq, opts, chat=True)


async def apply_template(state: ServerState, request: web.Request) -> web.Response:
    """llama.cpp's ``/apply-template``: a chat body's prompt text, without generating."""
    body = await read_json(request, state)
    greq, _ = openai.parse_chat(body)
    async with state.use(model_field(body)) as model:
        return json_response({"prompt": await asyncio.to_thread(model.require_engine().apply_template, greq)})


async def _serve(state: ServerState, model: ModelEntry, request: web.Request, greq: GenerationRequest,
                 opts: openai.StreamOptions, chat: bool) -> web.StreamResponse:
    handle = await submit(model.require_engine(), greq)
    fmt = handle.prepared.output or OutputFormat()
    if not opts.stream:
        outcome = await run_to_end(handle)
        body = (openai.chat_response(outcome, model.id, [OutputParser(fmt).parse(c.text) for c in outcome.choices])
                if chat else openai.completion_response(outcome, model.id, greq.echo))
        return json_response(body, headers=warning_headers(handle))

    writer = SSEWriter(request, warning_headers(handle))
    maker = openai.ChunkMaker(handle.id, int(time.time()), model.id, chat, opts.include_usage)
    prompt_texts = [p.text for p in handle.prepared.prompts]

    parsers: dict[int, OutputParser] = {}  # one per chat choice: its reply split as it streams

    def parser(index: int) -> OutputParser:
        if index not in parsers:
            parsers[index] = OutputParser(fmt)
        return parsers[index]

    async def send(index: int, deltas: list[Delta]) -> None:
        for d in deltas:
            for chunk in maker.delta(index, d):
                await writer.data(chunk)

    async def body() -> AsyncIterator[None]:
        await writer.open()
        started: set[int] = set()

        async def start(index: int) -> None:
            if index in started:
                return
            started.add(index)
            first = maker.start(index)
            if first is not None:
                await writer.data(first)
            elif greq.echo:
                await writer.data(maker.text(index, prompt_texts[index // greq.n]))

        async for event in events_with_keepalive(handle, writer, state.config.keepalive_seconds):
            if event.kind == "text":
                await start(event.index)
                if event.text and chat:
                    await send(event.index, parser(event.index).feed(event.text))
                elif event.text:
                    await writer.data(maker.text(event.index, event.text))
            elif event.kind == "choice" and event.choice is not None:
                await start(event.index)
                if chat:
                    await send(event.index, parser(event.index).finish())
                await writer.data(maker.end(event.choice, greq.echo, called=chat and parser(event.index).calls > 0))
            elif event.kind == "done" and event.outcome is not None:
                for choice in event.outcome.choices:  # choices that never ran (aborted in the queue)
                    if choice.index not in started:
                        await start(choice.index)
                        await writer.data(maker.end(choice, greq.echo))
                if opts.include_usage:
                    await writer.data(maker.usage(event.outcome))
                await writer.done()
            elif event.kind == "error" and event.error is not None:
                # after the headers, an error can only travel inside the stream (openai-python raises it)
                await writer.data(error_payload("openai", classify(event.error)))
                await writer.done()
                return
            yield None

    return await stream_guard(handle, writer, body())


def routes() -> list[Route]:
    out: list[Route] = []
    for prefix in ("/v1", ""):
        out += [
            Route("GET", f"{prefix}/models", models, "openai"),
            Route("POST", f"{prefix}/completions", completions, "openai", protected=True),
            Route("POST", f"{prefix}/chat/completions", chat_completions, "openai", protected=True),
        ]
    out.append(Route("POST", "/v1/completion", completions, "openai", protected=True))
    out.append(Route("POST", "/apply-template", apply_template, "openai", protected=True))
    return out
