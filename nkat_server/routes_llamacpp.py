"""llama.cpp server's native routes (``/health``, ``/props``, ``/completion``, ``/tokenize``,
``/detokenize``) and the small probes (``/ping``, ``/slots``)."""

from __future__ import annotations

from typing import AsyncIterator

from aiohttp import web

from adapters import llamacpp
from adapters.fields import Fields
from adapters.samplers import LLAMACPP_DEFAULTS, read_sampling
from nkat_runtime.errors import InvalidRequestError
from nkat_runtime.text.fim import fim_tokens, infill_prompt

from .errors import classify, error_payload
from .framework import Route, ServerState, json_response, model_field, read_json
from .jobs import events_with_keepalive, run_to_end, stream_guard, submit, warning_headers
from .models import ModelEntry
from .sse import SSEWriter


def _settings(model: ModelEntry) -> dict:
    return llamacpp.generation_settings(read_sampling(Fields({}), LLAMACPP_DEFAULTS), model.require_engine().context,
                                        model.id)


async def health(state: ServerState, request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def ping(state: ServerState, request: web.Request) -> web.Response:
    return json_response({"status": "healthy"})


async def slots(state: ServerState, request: web.Request) -> web.Response:
    """llama.cpp's slot list: each KV-cache slot, whether it is generating, the tokens it holds."""
    async with state.use(model_field(None, request.query)) as m:
        return json_response(m.require_engine().slot_info())


async def props(state: ServerState, request: web.Request) -> web.Response:
    async with state.use(model_field(None, request.query)) as m:
        return json_response(_props(state, m))


def _props(state: ServerState, m: ModelEntry) -> dict:
    engine = m.require_engine()
    lm = engine.lm
    tok = lm.tokenizer
    return {
        "default_generation_settings": _settings(m),
        "total_slots": engine.config.slots,
        "model_path": str(lm.path),
        "chat_template": lm.chat_template or "",
        "bos_token": tok.id_to_token(tok.bos_id) if tok.bos_id is not None else "",
        "eos_token": tok.id_to_token(tok.eos_id) if tok.eos_id is not None else "",
        "build_info": f"nkat {state.version}",
        "modalities": {"vision": False, "audio": False},
        "nkat": {**engine.batch_stats(), "kv_cache": engine.cache_stats()},
    }


async def completion(state: ServerState, request: web.Request) -> web.StreamResponse:
    body = await read_json(request, state)
    greq, stream, return_tokens = llamacpp.parse_completion(body)
    async with state.use(model_field(body)) as m:
        return await _complete(state, m, request, greq, stream, return_tokens)


async def infill(state: ServerState, request: web.Request) -> web.StreamResponse:
    """llama.cpp's fill-in-the-middle: the prompt built from ``input_prefix`` / ``input_suffix`` /
    ``input_extra`` with the model's FIM tokens; the rest of the body as ``/completion``'s."""
    body = await read_json(request, state)
    prefix, suffix, extra, prompt = llamacpp.parse_infill(body)
    greq, stream, return_tokens = llamacpp.parse_completion({**body, "prompt": [0]})
    async with state.use(model_field(body)) as m:
        lm = m.require_engine().lm
        fim = fim_tokens(lm.gguf, lm.tokenizer)
        if fim is None:
            raise InvalidRequestError(f"{m.name} has no fill-in-the-middle tokens (FIM prefix/suffix/middle): "
                                      "/infill needs a code model that has them, such as Qwen2.5-Coder")
        greq.prompts = [infill_prompt(lm.tokenizer, fim, prefix, suffix, extra, prompt)]
        return await _complete(state, m, request, greq, stream, return_tokens)


async def _complete(state: ServerState, m: ModelEntry, request: web.Request, greq, stream: bool,
                    return_tokens: bool) -> web.StreamResponse:
    engine = m.require_engine()
    handle = await submit(engine, greq)
    settings = llamacpp.generation_settings(handle.prepared.gen.sampling, engine.context, m.id)
    if not stream:
        outcome = await run_to_end(handle)
        results = [llamacpp.completion_result(c, outcome, m.id, settings, return_tokens)
                   for c in outcome.choices]
        return json_response(results[0] if len(results) == 1 else results, headers=warning_headers(handle))

    writer = SSEWriter(request, warning_headers(handle))

    async def body() -> AsyncIterator[None]:
        await writer.open()
        outcome_seen = False
        async for event in events_with_keepalive(handle, writer, state.config.keepalive_seconds):
            if event.kind == "text" and event.text:
                await writer.data(llamacpp.stream_piece(event.index, event.text))
            elif event.kind == "done" and event.outcome is not None and not outcome_seen:
                outcome_seen = True
                for choice in event.outcome.choices:
                    final = llamacpp.completion_result(choice, event.outcome, m.id, settings, return_tokens)
                    final["content"] = ""
                    await writer.data(final)
            elif event.kind == "error" and event.error is not None:
                await writer.data(error_payload("llamacpp", classify(event.error)))
                return
            yield None

    return await stream_guard(handle, writer, body())


async def tokenize(state: ServerState, request: web.Request) -> web.Response:
    body = await read_json(request, state)
    content, add_special, parse_special, with_pieces = llamacpp.parse_tokenize(body)
    async with state.use(model_field(body)) as m:
        engine = m.require_engine()
        ids = engine.tokenize(content, add_special=add_special, parse_special=parse_special)
        if with_pieces:
            return json_response({"tokens": [llamacpp.token_piece(i, engine.token_bytes(i)) for i in ids]})
    return json_response({"tokens": ids})


async def detokenize(state: ServerState, request: web.Request) -> web.Response:
    body = await read_json(request, state)
    ids = llamacpp.parse_detokenize(body)
    async with state.use(model_field(body)) as m:
        return json_response({"content": m.require_engine().detokenize(ids)})


def routes() -> list[Route]:
    return [
        Route("GET", "/health", health, "llamacpp"),
        Route("GET", "/ping", ping, "llamacpp"),
        Route("GET", "/slots", slots, "llamacpp"),
        Route("GET", "/props", props, "llamacpp"),
        Route("POST", "/completion", completion, "llamacpp", protected=True),
        Route("POST", "/infill", infill, "llamacpp", protected=True),
        Route("POST", "/tokenize", tokenize, "llamacpp", protected=True),
        Route("POST", "/detokenize", detokenize, "llamacpp", protected=True),
    ]
