"""Grammars over bytes: does a grammar accept a text, random texts it accepts, and the reading of
a JSON schema that llama.cpp's converter (and ours) follow, for ``jsonschema`` to judge by.

llguidance with a 256-token vocabulary (one token per byte, plus an end token), so a grammar is
checked on exact bytes, with no model tokenizer in between."""

from __future__ import annotations

import functools
import random

import jsonschema
import llguidance


class _Bytes:
    def __init__(self) -> None:
        self.tokens = [bytes([i]) for i in range(256)] + [b""]
        self.eos_token_id, self.bos_token_id, self.special_token_ids = 256, None, [256]

    def __call__(self, text: bytes | str) -> list[int]:
        return list(text.encode() if isinstance(text, str) else text)


TOKENIZER = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Bytes()))


@functools.lru_cache(maxsize=64)
def _compiled(gbnf: str) -> str:
    return llguidance.grammar_from("gbnf", gbnf)


def matcher(gbnf: str) -> llguidance.LLMatcher:
    m = llguidance.LLMatcher(TOKENIZER, _compiled(gbnf), log_level=0)
    assert not m.is_error(), m.get_error()
    return m


@functools.lru_cache(maxsize=64)
def _reusable(gbnf: str) -> llguidance.LLMatcher:
    return matcher(gbnf)


def accepts(gbnf: str, text: str) -> bool:
    m, data = _reusable(gbnf), list(text.encode())
    m.reset()
    if m.validate_tokens(data) < len(data):  # checked without moving: the matcher stays usable
        return False
    m.consume_tokens(data)
    return m.is_accepting()


def samples(gbnf: str, n: int, seed: int = 0, max_bytes: int = 200) -> list[str]:
    """Up to ``n`` random texts the grammar accepts (a random walk over allowed bytes, ending with
    probability 1/4 wherever the text is complete)."""
    rng, out = random.Random(seed), []
    for _ in range(n * 4):
        m, text = matcher(gbnf), bytearray()
        while len(text) < max_bytes:
            mask = m.compute_bitmask()
            allowed = [b for b in range(256) if mask[b // 8] >> (b % 8) & 1]
            if m.is_accepting() and (not allowed or rng.random() < 0.25):
                try:
                    out.append(text.decode())
                except UnicodeDecodeError:
                    pass
                break
            if not allowed:
                break
            printable = [b for b in allowed if 0x20 <= b < 0x7F] or allowed  # mostly readable text
            b = rng.choice(printable if rng.random() < 0.9 else allowed)
            m.consume_token(b)
            text.append(b)
        if len(out) >= n:
            break
    return out


# --- judging by jsonschema ---------------------------------------------------------------------
FORMATS = jsonschema.FormatChecker()


def closed(schema):
    """``schema`` with llama.cpp's reading made explicit: an object with properties and no
    ``additionalProperties`` allows no other keys; ``properties`` or ``items`` without a ``type``
    mean an object or an array."""
    if isinstance(schema, dict):
        out = {k: closed(v) if k not in ("enum", "const", "allOf") else v for k, v in schema.items()}
        if isinstance(out.get("prefixItems"), dict):  # an old spelling of "items" ("items" wins)
            out.setdefault("items", out.pop("prefixItems"))
            out.pop("prefixItems", None)
        if "type" not in out and ("properties" in out or "additionalProperties" in out):
            out["type"] = "object"  # an object's keywords without a type mean an object
        elif "type" not in out and ("items" in out or "prefixItems" in out):
            out["type"] = "array"
        if "allOf" in out:  # the parts together say which keys exist
            out["unevaluatedProperties"] = False
        elif "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [closed(v) for v in schema]
    return schema
