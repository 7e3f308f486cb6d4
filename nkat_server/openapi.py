"""The server's OpenAPI 3.1 document (``GET /openapi.json``), built from the route table.

Request bodies are described as far as clients depend on them (the fields' types; unknown
fields are ignored, so objects stay open). Every route documents the statuses it can answer,
each with a JSON body in the route's error dialect; the hardening tests hold the server to it.
"""

from __future__ import annotations

from typing import Any

from .framework import Route

_INT, _NUM, _STR, _BOOL = {"type": "integer"}, {"type": "number"}, {"type": "string"}, {"type": "boolean"}
_STOP = {"oneOf": [_STR, {"type": "array", "items": _STR}]}
_SAMPLING = {"temperature": _NUM, "top_k": _INT, "top_p": _NUM, "min_p": _NUM, "seed": _INT,
             "repetition_penalty": _NUM, "presence_penalty": _NUM, "frequency_penalty": _NUM}


def _obj(props: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(required), "additionalProperties": True}


KOBOLD_GENERATE = _obj({"prompt": _STR, "memory": _STR, "max_length": _INT, "max_context_length": _INT,
                        "rep_pen": _NUM, "stop_sequence": {"type": "array", "items": _STR}, "genkey": _STR,
                        "trim_stop": _BOOL, "ban_eos_token": _BOOL, **_SAMPLING}, ("prompt",))
OPENAI_COMPLETION = _obj({"model": _STR, "prompt": {"oneOf": [_STR, {"type": "array", "items": _STR},
                                                               {"type": "array", "items": _INT}]},
                          "max_tokens": _INT, "stream": _BOOL, "n": _INT, "stop": _STOP, "echo": _BOOL,
                          "logprobs": _INT, **_SAMPLING}, ("prompt",))
_MESSAGE = _obj({"role": {"enum": ["system", "developer", "user", "assistant", "tool"]}, "content": _STR,
                 "tool_call_id": _STR}, ("role", "content"))
_TOOL = _obj({"type": {"enum": ["function"]}, "function": _obj({"name": _STR, "description": _STR,
                                                                 "parameters": {"type": "object"}}, ("name",))},
             ("type", "function"))
OPENAI_CHAT = _obj({"model": _STR, "messages": {"type": "array", "items": _MESSAGE, "minItems": 1},
                    "max_tokens": _INT, "max_completion_tokens": _INT, "stream": _BOOL, "n": _INT, "stop": _STOP,
                    "tools": {"type": "array", "items": _TOOL},
                    "tool_choice": {"oneOf": [{"enum": ["auto", "none", "required"]}, {"type": "object"}]},
                    "parallel_tool_calls": _BOOL, "reasoning_format": {"enum": ["none", "deepseek", "deepseek-legacy",
                                                                                  "auto"]},
                    "chat_template_kwargs": {"type": "object"}, **_SAMPLING}, ("messages",))
LLAMACPP_COMPLETION = _obj({"prompt": {"oneOf": [_STR, {"type": "array", "items": _INT}]}, "n_predict": _INT,
                            "stream": _BOOL, "stop": {"type": "array", "items": _STR}, "cache_prompt": _BOOL,
                            "n_probs": _INT, **_SAMPLING}, ("prompt",))

_INPUTS = {"oneOf": [_STR, {"type": "array", "items": {"oneOf": [_STR, _INT, {"type": "array", "items": _INT}]}}]}
EMBEDDING_INPUT = _obj({"input": _INPUTS, "model": _STR, "encoding_format": {"enum": ["float", "base64"]}}, ("input",))
LLAMACPP_EMBEDDING = _obj({"content": _INPUTS, "embd_normalize": {"enum": [-1, 2]}}, ("content",))

BODIES: dict[str, dict[str, Any]] = {
    "/api/v1/generate": KOBOLD_GENERATE, "/api/extra/generate/stream": KOBOLD_GENERATE,
    "/api/extra/generate/check": _obj({"genkey": _STR}), "/api/extra/abort": _obj({"genkey": _STR}),
    "/api/extra/last_logprobs": _obj({"genkey": _STR}),
    "/api/extra/tokencount": _obj({"prompt": _STR}, ("prompt",)), "/api/extra/tokenize": _obj({"prompt": _STR}, ("prompt",)),
    "/api/extra/detokenize": _obj({"ids": {"type": "array", "items": _INT}}, ("ids",)),
    "/v1/completions": OPENAI_COMPLETION, "/completions": OPENAI_COMPLETION, "/v1/completion": OPENAI_COMPLETION,
    "/v1/chat/completions": OPENAI_CHAT, "/chat/completions": OPENAI_CHAT, "/apply-template": OPENAI_CHAT,
    "/api/extra/json_to_grammar": _obj({"schema": {"type": "object"}}),
    "/completion": LLAMACPP_COMPLETION, "/tokenize": _obj({"content": _STR}, ("content",)),
    "/detokenize": _obj({"tokens": {"type": "array", "items": _INT}}, ("tokens",)),
    "/infill": _obj({"input_prefix": _STR, "input_suffix": _STR, "prompt": _STR, "n_predict": _INT, "stream": _BOOL,
                     "input_extra": {"type": "array", "items": _obj({"filename": _STR, "text": _STR})},
                     **_SAMPLING}),
    "/v1/embeddings": EMBEDDING_INPUT, "/api/extra/embeddings": EMBEDDING_INPUT,
    "/embedding": LLAMACPP_EMBEDDING, "/embeddings": LLAMACPP_EMBEDDING,
    "/slots/{id}": _obj({"filename": _STR}), "/models/load": _obj({"model": _STR}, ("model",)),
    "/models/unload": _obj({"model": _STR}, ("model",)), "/models/reload": _obj({"model": _STR}, ("model",)),
}
STREAMING = {"/api/extra/generate/stream", "/v1/completions", "/completions", "/v1/completion",
             "/v1/chat/completions", "/chat/completions", "/completion", "/infill"}
PAGES = {"/": "text/html", "/ui": "text/html", "/metrics": "text/plain"}  # 200s that are not JSON
ERRORS = {"400": "malformed or invalid request", "401": "missing or wrong key (protected routes, with --password)",
          "404": "no such route", "405": "method not allowed on this route",
          "408": "the request body did not arrive in time", "413": "request body too large",
          "403": "admin route on a server without --admin-password",
          "409": "the model still runs requests (unload); the slot is busy (slot actions)",
          "503": "queue full, model loading failed, or shutting down (Retry-After)",
          "507": "the slot file could not be written or read (disk full, folder gone)"}


def statuses(route: Route) -> set[int]:
    """The statuses ``route`` may answer."""
    out = {200, 404, 405, 503}  # not 500: a 500 is a crash (logged; the server goes on), never an answer
    if route.method == "POST":
        out |= {400, 408, 413}
    if route.protected:
        out.add(401)
    return out | set(route.statuses)


def document(routes: list[Route], version: str) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    error = {"application/json": {"schema": {"type": "object"}}}
    for r in routes:
        ok: dict[str, Any] = {"application/json": {"schema": {}}}
        if r.path in STREAMING:
            ok["text/event-stream"] = {"schema": {"type": "string"}}
        if r.path in PAGES:
            ok = {PAGES[r.path]: {"schema": {"type": "string"}}}
        responses = {"200": {"description": "success", "content": ok}}
        for code in sorted(statuses(r) - {200}):
            responses[str(code)] = {"description": ERRORS[str(code)], "content": error}
        op: dict[str, Any] = {"operationId": f"{r.method.lower()}{r.path.replace('/', '_')}",
                              "tags": [r.dialect], "responses": responses}
        if r.method == "POST":
            op["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": BODIES.get(r.path, {"type": "object"})}}}
        if r.protected:
            op["security"] = [{"bearer": []}]
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "NKAT server", "version": version,
                 "description": "KoboldCpp, OpenAI and llama.cpp server dialects over one engine."},
        "paths": paths,
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
