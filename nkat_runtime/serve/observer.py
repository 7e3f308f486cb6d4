"""What the engine reports as it works, for whoever watches (the server's ``/metrics``).

The engine calls these from its worker thread; an implementation must be thread-safe and quick.
Times are what a streaming client sees: from the job's submission to its first piece of text,
and between one piece and the next of the same sequence.
"""

from __future__ import annotations

from typing import Protocol


class Observer(Protocol):
    def first_token(self, seconds: float) -> None:
        """Submission to a sequence's first piece of text (queueing and prefill included)."""

    def next_token(self, seconds: float) -> None:
        """The gap between two pieces of text of one sequence."""

    def job_done(self, prompt_tokens: int, generated_tokens: int, aborted: bool) -> None:
        """A job ended: the tokens it read and wrote."""


class NoObserver:
    def first_token(self, seconds: float) -> None:
        pass

    def next_token(self, seconds: float) -> None:
        pass

    def job_done(self, prompt_tokens: int, generated_tokens: int, aborted: bool) -> None:
        pass
