"""Generation in the calling thread: the scheduler with one slot, stepped until its sequence ends.

The CLIs, the benchmarks and the tests generate through this; the server runs the same
:class:`~nkat_runtime.serve.scheduler.Scheduler` with many slots in its engine thread. So chunked
prefill, prompt reuse, the "last prompt token runs as the first decode step" rule and abort exist
once. A :class:`Driver` keeps its slot between calls: the next prompt reuses the cached prefix.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Sequence

import torch

from ..loader import LoadedModel
from ..request import Choice
from .scheduler import Scheduler, SchedulerConfig, Task
from .sequence import GenerationParams, SequenceRun


class Stream:
    """The text pieces of one generation as they come (iterate it once); ``choice`` is complete
    when the iteration ends."""

    def __init__(self, choice: Choice, pieces: Iterator[str]) -> None:
        self.choice = choice
        self._pieces = pieces

    def __iter__(self) -> Iterator[str]:
        return self._pieces


class Driver:
    def __init__(self, lm: LoadedModel, context_shift: bool = False, cache_reuse: int = 32) -> None:
        """``context_shift`` off (the default here): a generation ends with "length" at the context's end."""
        self.lm = lm
        self.sched = Scheduler(lm, SchedulerConfig(slots=1, cache_reuse=cache_reuse, context_shift=context_shift,
                                                   cache_ram_bytes=0))

    def stream(self, prompt: Sequence[int], params: GenerationParams, *, generator: torch.Generator | None = None,
               should_abort: Callable[[], bool] | None = None) -> Stream:
        prompt = list(prompt)
        if not prompt:
            raise ValueError("the prompt is empty (no tokens)")
        if len(prompt) >= self.lm.context:
            raise ValueError(f"the prompt has {len(prompt)} tokens; the context holds {self.lm.context}")
        if not self.sched.cfg.context_shift:  # what fits after the prompt, as the server's preparer allows
            params = dataclasses.replace(params, max_new=min(params.max_new, self.lm.context - len(prompt)))
        run = SequenceRun(self.lm, prompt, params, generator)
        return Stream(run.choice, self._pieces(run, should_abort or (lambda: False)))

    def _pieces(self, run: SequenceRun, should_abort: Callable[[], bool]) -> Iterator[str]:
        pieces: list[str] = []
        ended: list[BaseException | None] = []
        left = [False]  # the caller stopped iterating: abort, so the slot is free for the next call
        self.sched.add(Task(run, pieces.append, ended.append, lambda: left[0] or should_abort()))
        try:
            while not ended:
                self.sched.step()
                yield from pieces
                pieces.clear()
        finally:
            if not ended:
                left[0] = True
                self.sched.step()
        if ended[0] is not None:
            raise ended[0]

    def generate(self, prompt: Sequence[int], params: GenerationParams, **kwargs) -> Choice:
        stream = self.stream(prompt, params, **kwargs)
        for _ in stream:
            pass
        return stream.choice


def generate(lm: LoadedModel, prompt: Sequence[int], params: GenerationParams, **kwargs) -> Choice:
    """One generation from an empty slot."""
    return Driver(lm).generate(prompt, params, **kwargs)
