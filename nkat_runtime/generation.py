"""Generation for one sequence, in the calling thread: prefill the prompt (in chunks, reusing a
cached prefix), then one-token decode steps driven by :class:`~nkat_runtime.sequence.SequenceRun`.

The server's engine drives many sequences at once (:mod:`nkat_runtime.scheduler`); the CLI,
the benchmarks and the tests use this single-sequence driver, which runs cache row 0.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator, Sequence

import torch

from .loader import LoadedModel
from .sampling import SamplingParams
from .sequence import (  # noqa: F401  (re-exported: the names callers know)
    GenerationResult,
    PhraseBans,
    SequenceRun,
    StopMatcher,
    common_prefix,
)

PREFILL_CHUNK = 256  # prompt tokens per forward pass (abort is checked between chunks)
LOGPROBS_CHUNK = 64  # ... when every position's logits are kept


def prefill_bounds(start: int, end: int, chunk: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk, end)) for s in range(start, end, chunk)]


def generate_stream(
    lm: LoadedModel,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    params: SamplingParams,
    stop: Sequence[str] = (),
    stop_ids: Sequence[int] | None = None,
    should_abort: Callable[[], bool] | None = None,
    result: GenerationResult | None = None,
    *,
    generator: torch.Generator | None = None,
    banned_phrases: Sequence[str] = (),
    logprobs: int | None = None,
    prompt_logprobs: bool = False,
    include_stop: bool = False,
    skip_special: bool = True,
    kv_prefix: Sequence[int] | None = None,
) -> Iterator[str]:
    """Yield text pieces as they are generated; fill ``result`` (if given) as it goes.

    ``generator`` overrides the one made from ``params.seed``. ``banned_phrases`` are undone by
    backtracking (case-insensitive). ``logprobs=N`` records each token's log-probability (under
    the raw model distribution) with N alternatives; ``prompt_logprobs`` does the same for the
    prompt. ``include_stop`` keeps a matched stop string in the text. ``kv_prefix`` names the
    tokens whose KV entries cache row 0 already holds (from the last call, ``result.kv_tokens``):
    the common prefix with the prompt is not computed again.
    """
    prompt = list(prompt_ids)
    if not prompt:
        raise ValueError("the prompt is empty (no tokens)")
    if len(prompt) >= lm.context:
        raise ValueError(f"the prompt has {len(prompt)} tokens; the context holds {lm.context}")
    max_new = max(0, min(max_new_tokens, lm.context - len(prompt)))
    run = SequenceRun(lm, prompt, max_new, params, stop, stop_ids, generator=generator,
                      banned_phrases=banned_phrases, logprobs=logprobs, include_stop=include_stop,
                      skip_special=skip_special, result=result)
    res = run.res
    model, device = lm.model, lm.device

    def forward(ids: Sequence[int], start: int, last_only: bool) -> torch.Tensor:
        tokens = torch.tensor([list(ids)], dtype=torch.long, device=device)
        pos = torch.arange(start, start + len(ids), device=device)
        res.kv_tokens = res.kv_tokens[:start]  # what a failed pass may have overwritten is no longer valid
        out = model(tokens, pos, kv_len=start + len(ids), last_only=last_only)[0]
        res.kv_tokens = res.kv_tokens + list(ids)
        return out

    t0 = time.perf_counter()
    reuse = 0 if prompt_logprobs or kv_prefix is None else min(common_prefix(kv_prefix, prompt), len(prompt) - 1)
    res.kv_tokens, res.cached_tokens = prompt[:reuse], reuse
    end = len(prompt) - 1 if max_new > 0 or prompt_logprobs else reuse  # nothing to generate: nothing to compute
    for start, stop_at in prefill_bounds(reuse, end, LOGPROBS_CHUNK if prompt_logprobs else PREFILL_CHUNK):
        if should_abort is not None and should_abort():
            run.end_prompt(time.perf_counter() - t0)
            yield run.finish("abort")
            return
        out = forward(prompt[start:stop_at], start, last_only=not prompt_logprobs)
        if prompt_logprobs:
            run.prompt_logits(out, start)
    feed = run.end_prompt(time.perf_counter() - t0, prompt_logprobs)
    while feed is not None:
        if should_abort is not None and should_abort():
            piece = run.finish("abort")
            if piece:
                yield piece
            return
        pos = len(res.kv_tokens) - feed.drop
        piece, feed = run.step(forward([feed.token], pos, True)[-1])
        if piece:
            yield piece


def generate(
    lm: LoadedModel,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    params: SamplingParams,
    stop: Sequence[str] = (),
    **kwargs,
) -> GenerationResult:
    res = GenerationResult()
    for _ in generate_stream(lm, prompt_ids, max_new_tokens, params, stop, result=res, **kwargs):
        pass
    return res
