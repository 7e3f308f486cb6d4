"""Generation for one sequence: prefill the prompt in one pass, then one-token decode steps.

Streaming yields text pieces that never split a UTF-8 character and never show a stop
string (text that might begin one is held back until it is clear).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from .loader import LoadedModel
from .sampling import SamplingParams, make_generator, sample
from .tokenizer import StreamDecoder


@dataclass
class GenerationResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "stop" (EOS/EOT or stop string) | "length" | "abort"
    stop_reason: str | None = None  # the stop string or token text that ended it
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def decode_tokens_per_second(self) -> float:
        steps = max(0, len(self.token_ids) - 1)  # the first token comes from the prefill
        return steps / self.decode_seconds if self.decode_seconds > 0 else 0.0


class StopMatcher:
    """Finds stop strings in a growing text; tells how much text is safe to emit."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]

    def find(self, text: str, start: int) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for s in self.stops:
            i = text.find(s, max(0, start - len(s) + 1))
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        return best

    def safe_length(self, text: str) -> int:
        """Length of the prefix of ``text`` that cannot be the start of a stop string."""
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        return len(text) - hold


def generate_stream(
    lm: LoadedModel,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    params: SamplingParams,
    stop: Sequence[str] = (),
    stop_ids: Sequence[int] | None = None,
    should_abort: Callable[[], bool] | None = None,
    result: GenerationResult | None = None,
) -> Iterator[str]:
    """Yield text pieces as they are generated; fill ``result`` (if given) as it goes."""
    res = result if result is not None else GenerationResult()
    prompt = list(prompt_ids)
    if not prompt:
        raise ValueError("the prompt is empty (no tokens)")
    if len(prompt) >= lm.context:
        raise ValueError(f"the prompt has {len(prompt)} tokens; the context holds {lm.context}")
    params.validate()
    max_new = max(0, min(max_new_tokens, lm.context - len(prompt)))
    stops = StopMatcher(stop)
    stop_set = set(lm.tokenizer.stop_ids if stop_ids is None else stop_ids)
    decoder = StreamDecoder(lm.tokenizer)
    gen = make_generator(params.seed)
    model, device = lm.model, lm.device
    res.prompt_tokens = len(prompt)
    history = list(prompt)
    text, emitted = "", 0
    hit_stop_string: str | None = None

    t0 = time.perf_counter()
    tokens = torch.tensor([prompt], dtype=torch.long, device=device)
    logits = model(tokens, torch.arange(len(prompt), device=device), last_only=True)[0, -1]
    res.prefill_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    pos = len(prompt)
    for step in range(max_new):
        if should_abort is not None and should_abort():
            res.finish_reason = "abort"
            break
        tok = sample(logits, params, history, gen)
        if tok in stop_set:
            res.finish_reason, res.stop_reason = "stop", lm.tokenizer.id_to_token(tok)
            break
        res.token_ids.append(tok)
        history.append(tok)
        text += decoder.feed(tok)
        hit = stops.find(text, emitted)
        if hit is not None:
            text = text[: hit[0]]
            res.finish_reason, res.stop_reason = "stop", hit[1]
            hit_stop_string = hit[1]
            break
        safe = stops.safe_length(text)
        if safe > emitted:
            yield text[emitted:safe]
            emitted = safe
        if step + 1 < max_new:
            step_tokens = torch.tensor([[tok]], dtype=torch.long, device=device)
            logits = model(step_tokens, torch.tensor([pos], device=device), kv_len=pos + 1)[0, -1]
            pos += 1
    if hit_stop_string is None:
        text += decoder.flush()
    if len(text) > emitted:
        yield text[emitted:]
    res.text = text
    res.decode_seconds = time.perf_counter() - t1


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
