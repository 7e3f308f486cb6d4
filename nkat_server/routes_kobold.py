"""KoboldAI / KoboldCpp routes: ``/api/v1/*``, ``/api/latest/*``, ``/api/extra/*`` and the probes
KoboldAI Lite makes on connect."""

from __future__ import annotations

from typing import AsyncIterator

from aiohttp import web

from adapters import kobold
from nkat_runtime.errors import InvalidRequestError
from nkat_runtime.request import Choice, GenerationRequest
from nkat_runtime.sampling.json_gbnf import schema_to_gbnf
from nkat_runtime.serve.engine import Engine

from .errors import ApiError, classify, error_payload
from .framework import Route, ServerState, json_response, model_field, read_json
from .jobs import events_with_keepalive, run_to_end, stream_guard, submit, warning_headers
from .sse import SSEWriter


async def model(state: ServerState, request: web.Request) -> web.Response:
    entry = state.models.find(model_field(None, request.query))
    return json_response(kobold.model_result(entry.name, state.authorised(request)))


async def info_version(state: ServerState, request: web.Request) -> web.Response:
    return json_response({"result": kobold.KOBOLD_API_VERSION})


async def max_length(state: ServerState, request: web.Request) -> web.Response:
    async with state.use(model_field(None, request.query)) as m:
        return json_response({"value": m.require_engine().default_max_tokens})


async def max_context(state: ServerState, request: web.Request) -> web.Response:
    async with state.use(model_field(None, request.query)) as m:
        return json_response({"value": m.require_engine().context})


async def soft_prompt(state: ServerState, request: web.Request) -> web.Response:
    return json_response({"value": ""})


async def soft_prompts_list(state: ServerState, request: web.Request) -> web.Response:
    return json_response({"values": []})


async def extra_version(state: ServerState, request: web.Request) -> web.Response:
    return json_response(kobold.version_info(bool(state.config.password), state.version))


async def perf(state: ServerState, request: web.Request) -> web.Response:
    async with state.use(model_field(None, request.query)) as m:
        return json_response(kobold.perf(m.require_engine().stats))


async def preload_story(state: ServerState, request: web.Request) -> web.Response:
    return json_response({})


async def sd_models(state: ServerState, request: web.Request) -> web.Response:
    return json_response([])


async def generate(state: ServerState, request: web.Request) -> web.Response:
    body = await read_json(request, state)
    greq = kobold.parse_generate(body)
    async with state.use(model_field(body)) as m:
        handle = await submit(m.require_engine(), greq)
        outcome = await run_to_end(handle)
    return json_response(kobold.generate_response(outcome), headers=warning_headers(handle))


async def generate_stream(state: ServerState, request: web.Request) -> web.StreamResponse:
    body = await read_json(request, state)
    greq = kobold.parse_generate(body)
    async with state.use(model_field(body)) as m:
        return await _stream(m.require_engine(), request, greq)


async def _stream(engine: Engine, request: web.Request, greq: GenerationRequest) -> web.StreamResponse:
    handle = await submit(engine, greq)
    writer = SSEWriter(request, warning_headers(handle))

    async def body() -> AsyncIterator[None]:
        await writer.open()
        last: Choice | None = None
        async for event in events_with_keepalive(handle, None, 0):
            if event.kind == "text" and event.text:
                await writer.event("message", kobold.stream_piece(event.text))
            elif event.kind == "choice" and last is None:
                last = event.choice
            elif event.kind == "done":
                choice = last or (event.outcome.choices[0] if event.outcome and event.outcome.choices else None)
                if choice is not None:
                    await writer.event("message", kobold.stream_end(choice))
            elif event.kind == "error" and event.error is not None:
                # KoboldCpp just closes the stream; an "error" event (which Lite ignores) says why
                await writer.event("error", error_payload("kobold", classify(event.error)))
                return
            yield None

    return await stream_guard(handle, writer, body())


async def check(state: ServerState, request: web.Request) -> web.Response:
    genkey = ""
    if request.method == "POST":
        genkey = kobold.parse_genkey(await read_json(request, state, required=False))
    texts = [engine.check(genkey) for engine in state.models.engines()]
    return json_response(kobold.check_response(next((t for t in texts if t), "")))


async def abort(state: ServerState, request: web.Request) -> web.Response:
    genkey = kobold.parse_genkey(await read_json(request, state, required=False))
    answers = [engine.abort(genkey) for engine in state.models.engines()]
    found = [a for a in answers if a[0]]
    return json_response(kobold.abort_response(*(found[0] if found else (False, all(a[1] for a in answers)))))


async def last_logprobs(state: ServerState, request: web.Request) -> web.Response:
    genkey = kobold.parse_genkey(await read_json(request, state, required=False))
    found = [engine.last_logprobs(genkey) for engine in state.models.engines()]
    return json_response({"logprobs": kobold.logprobs_object(next((f for f in found if f is not None), None))})


async def tokencount(state: ServerState, request: web.Request) -> web.Response:
    try:
        body = await read_json(request, state)
        text, special = kobold.parse_tokencount(body)
        name = model_field(body)
    except (InvalidRequestError, ApiError) as exc:
        status = exc.status if isinstance(exc, ApiError) else 400
        return json_response({"value": -1, "ids": [], **kobold.error_body(str(exc))}, status=status)
    async with state.use(name) as m:
        ids = m.require_engine().tokenize(text, add_special=special)
    return json_response({"value": len(ids), "ids": ids})


async def json_to_grammar(state: ServerState, request: web.Request) -> web.Response:
    """koboldcpp's ``/api/extra/json_to_grammar``: ``{"schema": {...}}`` (or the schema as the body) →
    ``{"result": GBNF, "success": true}``; an unsupported schema is a 400 with ``success: false``."""
    try:
        body = await read_json(request, state)
        schema = body.get("schema", body) if isinstance(body, dict) else body
        grammar = schema_to_gbnf(schema)
    except (InvalidRequestError, ApiError) as exc:
        status = exc.status if isinstance(exc, ApiError) else 400
        return json_response({"result": "", "success": False, **kobold.error_body(str(exc))}, status=status)
    return json_response({"result": grammar, "success": True})


async def detokenize(state: ServerState, request: web.Request) -> web.Response:
    try:
        body = await read_json(request, state)
        ids = kobold.parse_detokenize(body)
        async with state.use(model_field(body)) as m:
            text = m.require_engine().detokenize(ids)
    except Exception as exc:  # noqa: BLE001 - KoboldCpp's own failure shape
        status = exc.status if isinstance(exc, ApiError) else 400
        return json_response({"result": "", "success": False, **kobold.error_body(str(exc))}, status=status)
    return json_response({"result": text, "success": True})


def routes() -> list[Route]:
    out: list[Route] = []
    for base in ("/api/v1", "/api/latest"):
        out += [
            Route("GET", f"{base}/model", model, "kobold"),
            Route("GET", f"{base}/info/version", info_version, "kobold"),
            Route("GET", f"{base}/config/max_length", max_length, "kobold"),
            Route("GET", f"{base}/config/max_context_length", max_context, "kobold"),
            Route("GET", f"{base}/config/soft_prompt", soft_prompt, "kobold"),
            Route("GET", f"{base}/config/soft_prompts_list", soft_prompts_list, "kobold"),
            Route("POST", f"{base}/generate", generate, "kobold", protected=True),
        ]
    out += [
        Route("GET", "/api/extra/version", extra_version, "kobold"),
        Route("GET", "/api/extra/true_max_context_length", max_context, "kobold"),
        Route("GET", "/api/extra/perf", perf, "kobold"),
        Route("GET", "/api/extra/preloadstory", preload_story, "kobold"),
        Route("GET", "/sdapi/v1/sd-models", sd_models, "kobold"),
        Route("POST", "/api/extra/generate/stream", generate_stream, "kobold", protected=True),
        Route("GET", "/api/extra/generate/check", check, "kobold", protected=True),
        Route("POST", "/api/extra/generate/check", check, "kobold", protected=True),
        Route("POST", "/api/extra/abort", abort, "kobold", protected=True),
        Route("POST", "/api/extra/last_logprobs", last_logprobs, "kobold", protected=True),
        Route("POST", "/api/extra/tokencount", tokencount, "kobold", protected=True),
        Route("POST", "/api/extra/tokenize", tokencount, "kobold", protected=True),
        Route("POST", "/api/extra/detokenize", detokenize, "kobold", protected=True),
        Route("POST", "/api/extra/json_to_grammar", json_to_grammar, "kobold"),
    ]
    return out
