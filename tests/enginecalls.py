"""Requests to an :class:`Engine` without HTTP, for the serving tests."""

from __future__ import annotations

import asyncio

from nkat_runtime.request import GenerationRequest
from nkat_runtime.sampling.params import SamplingParams
from nkat_runtime.serve.engine import Engine

GREEDY = SamplingParams.greedy()


def req(prompt, **kw) -> GenerationRequest:
    kw.setdefault("sampling", GREEDY)
    kw.setdefault("seed", 7)
    return GenerationRequest(prompts=[prompt], **kw)


async def result(engine: Engine, request: GenerationRequest):
    return await engine.submit(engine.prepare(request)).result()


def run(engine: Engine, request: GenerationRequest):
    return asyncio.run(result(engine, request))


def forget(engine: Engine) -> None:
    """Drop everything cached outside running sequences (slots, RAM cache, shared blocks)."""
    engine.sched.cache.clear()


def ids(n: int, start: int = 10) -> list[int]:
    return [start + (i * 7) % 60 for i in range(n)]  # the tiny vocabulary has 275 tokens
