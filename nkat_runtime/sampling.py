"""Sampling: pure functions over a logits vector, and the settings that drive them.

Order (llama.cpp's default chain): repetition penalty → top-k → top-p → min-p →
temperature → draw. ``temperature <= 0`` is greedy (argmax after the penalties).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40  # 0 = off
    top_p: float = 0.95  # 1.0 = off
    min_p: float = 0.05  # 0.0 = off
    repeat_penalty: float = 1.0  # 1.0 = off
    repeat_last_n: int = 64  # how many recent tokens the penalty looks at (-1 = all)
    seed: int | None = None

    def validate(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError("min_p must be in [0, 1]")
        if self.repeat_penalty <= 0:
            raise ValueError("repeat_penalty must be > 0")

    @classmethod
    def greedy(cls) -> "SamplingParams":
        return cls(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0)


def apply_repeat_penalty(logits: torch.Tensor, history: Sequence[int], penalty: float, last_n: int) -> torch.Tensor:
    """llama.cpp's penalty: a seen token's positive logit is divided by it, a negative one multiplied."""
    if penalty == 1.0 or not history:
        return logits
    recent = history if last_n < 0 else history[-last_n:] if last_n else []
    if not recent:
        return logits
    ids = torch.tensor(sorted(set(recent)), dtype=torch.long, device=logits.device)
    vals = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.numel():
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``p`` (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    cum = torch.cumsum(probs, dim=-1)
    remove = (cum - probs) >= p  # drop a token once the mass before it already reached p
    remove[0] = False
    out = logits.clone()
    out[order[remove]] = float("-inf")
    return out


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below ``min_p`` times the most likely one's."""
    if min_p <= 0.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    return logits.masked_fill(probs < min_p * probs.max(), float("-inf"))


def sample(
    logits: torch.Tensor, params: SamplingParams, history: Sequence[int] = (), generator: torch.Generator | None = None
) -> int:
    """Pick the next token from one row of logits [V]."""
    logits = apply_repeat_penalty(logits.float(), history, params.repeat_penalty, params.repeat_last_n)
    if params.temperature <= 0.0:
        return int(torch.argmax(logits))
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    logits = min_p_filter(logits, params.min_p)
    probs = torch.softmax(logits / params.temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None or seed < 0:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    return gen
