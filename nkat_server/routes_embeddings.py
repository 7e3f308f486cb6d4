"""Embeddings in the three dialects: OpenAI's ``/v1/embeddings`` (and koboldcpp's
``/api/extra/embeddings``, the same shape), llama.cpp's ``/embedding`` and ``/embeddings``.
One engine method computes them (:mod:`nkat_runtime.serve.embedding`), pooled as
``--pooling`` says."""

from __future__ import annotations

from aiohttp import web

from adapters import embeddings

from .framework import Route, ServerState, json_response, read_json


def _tokenize(state: ServerState):
    return lambda text: state.engine.tokenize(text, add_special=True, parse_special=True)


async def openai_embeddings(state: ServerState, request: web.Request) -> web.Response:
    req = embeddings.parse_openai(await read_json(request, state), _tokenize(state), state.engine.lm.tokenizer.vocab_size)
    vectors = await state.engine.embed(req.inputs, state.config.pooling, req.normalize)
    return json_response(embeddings.openai_response(req, vectors, state.model_id))


async def llamacpp_embeddings(state: ServerState, request: web.Request) -> web.Response:
    req = embeddings.parse_llamacpp(await read_json(request, state), _tokenize(state),
                                    state.engine.lm.tokenizer.vocab_size)
    vectors = await state.engine.embed(req.inputs, state.config.pooling, req.normalize)
    return json_response(embeddings.llamacpp_response(vectors))


def routes() -> list[Route]:
    return [
        Route("POST", "/v1/embeddings", openai_embeddings, "openai", protected=True),
        Route("POST", "/api/extra/embeddings", openai_embeddings, "kobold", protected=True),
        Route("POST", "/embedding", llamacpp_embeddings, "llamacpp", protected=True),
        Route("POST", "/embeddings", llamacpp_embeddings, "llamacpp", protected=True),
    ]
