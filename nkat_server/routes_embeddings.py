"""Embeddings in the three dialects: OpenAI's ``/v1/embeddings`` (and koboldcpp's
``/api/extra/embeddings``, the same shape), llama.cpp's ``/embedding`` and ``/embeddings``.
One engine method computes them (:mod:`nkat_runtime.serve.embedding`), pooled as
``--pooling`` says."""

from __future__ import annotations

from aiohttp import web

from adapters import embeddings
from nkat_runtime.serve.engine import Engine

from .framework import Route, ServerState, json_response, model_field, read_json


def _tokenize(engine: Engine):
    return lambda text: engine.tokenize(text, add_special=True, parse_special=True)


async def openai_embeddings(state: ServerState, request: web.Request) -> web.Response:
    body = await read_json(request, state)
    async with state.use(model_field(body)) as m:
        engine = m.require_engine()
        req = embeddings.parse_openai(body, _tokenize(engine), engine.lm.tokenizer.vocab_size)
        vectors = await engine.embed(req.inputs, state.config.pooling, req.normalize)
    return json_response(embeddings.openai_response(req, vectors, m.id))


async def llamacpp_embeddings(state: ServerState, request: web.Request) -> web.Response:
    body = await read_json(request, state)
    async with state.use(model_field(body)) as m:
        engine = m.require_engine()
        req = embeddings.parse_llamacpp(body, _tokenize(engine), engine.lm.tokenizer.vocab_size)
        vectors = await engine.embed(req.inputs, state.config.pooling, req.normalize)
    return json_response(embeddings.llamacpp_response(vectors))


def routes() -> list[Route]:
    return [
        Route("POST", "/v1/embeddings", openai_embeddings, "openai", protected=True),
        Route("POST", "/api/extra/embeddings", openai_embeddings, "kobold", protected=True),
        Route("POST", "/embedding", llamacpp_embeddings, "llamacpp", protected=True),
        Route("POST", "/embeddings", llamacpp_embeddings, "llamacpp", protected=True),
    ]
