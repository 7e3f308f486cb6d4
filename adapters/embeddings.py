"""Embedding requests and answers: OpenAI's ``/v1/embeddings`` (koboldcpp's
``/api/extra/embeddings`` takes the same shape) and llama.cpp's ``/embedding(s)``.

Inputs, as both accept them: a string, a list of strings, a list of token ids, or a list of
token-id lists. Strings are tokenised with the model's special tokens (BOS), as llama.cpp does.
"""

from __future__ import annotations

import base64
import struct
from dataclasses import dataclass
from typing import Any, Callable

from nkat_runtime.errors import InvalidRequestError

from .fields import Fields

MAX_INPUTS = 512


@dataclass
class EmbeddingRequest:
    inputs: list[list[int]]  # token ids, one list per input
    base64: bool = False  # OpenAI's encoding_format "base64": little-endian float32 bytes
    normalize: bool = True


def _inputs(value: Any, name: str, tokenize: Callable[[str], list[int]], n_vocab: int) -> list[list[int]]:
    if isinstance(value, str):
        items: list[Any] = [value]
    elif isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        items = [value]  # one input given as token ids
    elif isinstance(value, list):
        items = value
    else:
        raise InvalidRequestError(f"'{name}' must be a string, a list of strings or a list of token ids", name)
    if not items:
        raise InvalidRequestError(f"'{name}' is empty", name)
    if len(items) > MAX_INPUTS:
        raise InvalidRequestError(f"'{name}' has {len(items)} inputs; at most {MAX_INPUTS} are taken", name)
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            ids = tokenize(item)
        elif isinstance(item, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            ids = item
        else:
            raise InvalidRequestError(f"'{name}[{i}]' must be a string or a list of token ids", name)
        if not ids:
            raise InvalidRequestError(f"'{name}[{i}]' has no tokens", name)
        bad = next((t for t in ids if not 0 <= t < n_vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"'{name}[{i}]' holds token id {bad}, outside the vocabulary (0..{n_vocab - 1})",
                                      name)
        out.append(list(ids))
    return out


def parse_openai(body: Any, tokenize: Callable[[str], list[int]], n_vocab: int) -> EmbeddingRequest:
    f = Fields(body)
    if f.raw("input") is None:
        raise InvalidRequestError("'input' is required", "input")
    fmt = f.string("encoding_format", default="float")
    if fmt not in ("float", "base64"):
        raise InvalidRequestError(f"'encoding_format' must be float or base64, got {fmt[:20]!r}", "encoding_format")
    if f.has("dimensions"):
        raise InvalidRequestError("'dimensions' is not supported: embeddings have the model's width", "dimensions")
    return EmbeddingRequest(_inputs(f.body["input"], "input", tokenize, n_vocab), base64=fmt == "base64")


def parse_llamacpp(body: Any, tokenize: Callable[[str], list[int]], n_vocab: int) -> EmbeddingRequest:
    f = Fields(body)
    found = f.raw("content", "input")
    if found is None:
        raise InvalidRequestError("'content' is required", "content")
    norm = f.integer("embd_normalize", default=2)
    if norm not in (-1, 2):
        raise InvalidRequestError("'embd_normalize' must be 2 (Euclidean, the default) or -1 (none)", "embd_normalize")
    return EmbeddingRequest(_inputs(found[1], found[0], tokenize, n_vocab), normalize=norm == 2)


def openai_response(req: EmbeddingRequest, vectors: list[list[float]], model: str) -> dict[str, Any]:
    def encode(v: list[float]) -> Any:
        return base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode("ascii") if req.base64 else v

    tokens = sum(len(i) for i in req.inputs)
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def llamacpp_response(vectors: list[list[float]]) -> list[dict[str, Any]]:
    """llama.cpp's non-OpenAI shape: one entry per input, its pooled vector inside a list."""
    return [{"index": i, "embedding": [v]} for i, v in enumerate(vectors)]
