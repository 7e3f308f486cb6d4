"""Timing and memory measurements for the engine CLI and benchmarks/.

Figures come from real runs: wall-clock per prefill and per decode step, peak RSS from
the OS (``getrusage``), CUDA peak from torch when on a GPU. Medians are reported.
"""

from __future__ import annotations

import math
import resource
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from ..loader import LoadedModel


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / (1024 * 1024)
    return peak_rss_mb()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class DecodeTiming:
    step_seconds: list[float]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.step_seconds) * 1000.0

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.step_seconds) * 1000.0

    @property
    def tokens_per_second(self) -> float:
        """From the median step time (robust to a noisy, shared machine)."""
        return 1000.0 / self.median_ms if self.step_seconds else 0.0


def time_prefill(lm: LoadedModel, ids: list[int]) -> tuple[float, int]:
    """Seconds to prefill ``ids`` from an empty cache; returns (seconds, greedy next token)."""
    dev = lm.device
    x = torch.tensor([ids], dtype=torch.long, device=dev)
    _sync(dev)
    t0 = time.perf_counter()
    logits = lm.model(x, torch.arange(len(ids), device=dev), last_only=True)
    _sync(dev)
    return time.perf_counter() - t0, int(logits[0, -1].argmax())


def time_decode(lm: LoadedModel, start_pos: int, first_token: int, steps: int) -> DecodeTiming:
    """Greedy decode ``steps`` tokens after a prefill of ``start_pos`` tokens, timing each step."""
    dev = lm.device
    steps = max(0, min(steps, lm.context - start_pos))
    tok = first_token
    times = []
    for i in range(steps):
        pos = start_pos + i
        x = torch.tensor([[tok]], dtype=torch.long, device=dev)
        _sync(dev)
        t0 = time.perf_counter()
        logits = lm.model(x, torch.tensor([pos], device=dev), kv_len=pos + 1)
        tok = int(logits[0, -1].argmax())  # the host sync a real decode loop pays too
        times.append(time.perf_counter() - t0)
    return DecodeTiming(times)


def decode_weight_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of weights one decode step reads, the file's bytes for the same tensors): every
    packed or dense matrix once (the embedding's single row is left out)."""
    ours = file = 0
    for m in model.modules():
        if hasattr(m, "file_bytes") and callable(getattr(m, "weight_bytes", None)):
            ours += m.weight_bytes()
            file += m.file_bytes
    return ours, file


def tpe_score(ppl: float, overhead_fraction: float) -> float:
    """The guide's TPE score, in the form fixed by the .nkat spec: (1/ppl)/(1 + log10(1 + λ)),
    λ the measured fractional decode slowdown (clamped at 0)."""
    lam = max(0.0, overhead_fraction)
    return (1.0 / ppl) / (1.0 + math.log10(1.0 + lam))


def prompt_tokens(lm: LoadedModel, text: str, n: int) -> list[int]:
    """``n`` real tokens of ``text`` (repeated if short), BOS first when the model uses one."""
    ids = lm.tokenizer.encode(text, add_special=True)
    if not ids:
        raise ValueError("the benchmark text gives no tokens")
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]
