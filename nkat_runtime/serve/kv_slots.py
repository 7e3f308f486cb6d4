"""Cache rows ("slots") of the KV cache, what each one holds, and how a new prompt reuses them.

Each slot is one row of every layer's KV cache: ``tokens`` are the tokens whose keys and
values sit at positions ``0 .. len(tokens)-1`` of that row. A new prompt reuses

* the longest common prefix with what the slot holds (llama.cpp's ``cache_prompt``,
  Kobold.cpp's FastForwarding), and
* beyond it, chunks of at least ``min_chunk`` tokens that reappear at an earlier place (an old
  exchange was dropped from a chat): their entries are moved down and their keys re-rotated
  to the new positions (llama.cpp's ``--cache-reuse``, Kobold.cpp's ContextShift on a prompt).

A moved chunk's entries were computed while the dropped tokens were still in view, so its
continuation is close to, not equal to, a full prefill; the same holds for context shift.
Every layer keeps every position here, sliding-window layers included, so the move is
the same re-rotation on every architecture we run.

:class:`PromptCache` keeps the entries of slots that a different conversation took over, in
RAM, least recently used first out, within a byte budget.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .sequence import common_prefix


@dataclass
class Slot:
    row: int
    tokens: list[int] = field(default_factory=list)
    busy: bool = False
    last_used: float = 0.0


@dataclass
class ReusePlan:
    """How a prompt reuses a slot: keep ``prefix`` tokens, then move chunks ``(src, dst, n)``;
    afterwards positions ``0 .. reused-1`` hold ``prompt[:reused]``."""

    prefix: int
    moves: list[tuple[int, int, int]] = field(default_factory=list)
    reused: int = 0


def plan_reuse(cached: Sequence[int], prompt: Sequence[int], min_chunk: int, limit: int) -> ReusePlan:
    """The reuse of ``cached`` for ``prompt[:limit]`` (llama.cpp's cache-reuse walk): after the
    common prefix, a run of at least ``min_chunk`` matching tokens at the prompt's next place
    is kept and moved there; shorter runs are skipped. ``min_chunk`` 0 = prefix only."""
    prefix = min(common_prefix(cached, prompt), limit)
    plan = ReusePlan(prefix, [], prefix)
    if min_chunk <= 0:
        return plan
    head_c = head_p = prefix
    while head_c < len(cached) and head_p < limit:
        n = 0
        while head_c + n < len(cached) and head_p + n < limit and cached[head_c + n] == prompt[head_p + n]:
            n += 1
        if n >= min_chunk:
            plan.moves.append((head_c, head_p, n))
            head_c += n
            head_p += n
        else:
            head_c += 1
    plan.reused = head_p
    return plan


@dataclass
class CachedPrompt:
    tokens: list[int]
    kv: list[tuple[torch.Tensor, ...]]  # per layer, the cache's planes (K then V) [H_kv, n, ...]
    nbytes: int


class PromptCache:
    """Size-bounded LRU of slot contents in RAM (``limit_bytes`` 0 = off)."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.entries: OrderedDict[int, CachedPrompt] = OrderedDict()
        self._next = 0
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self.entries)

    def save(self, tokens: list[int], kv: list[tuple[torch.Tensor, ...]]) -> bool:
        nbytes = sum(t.numel() * t.element_size() for planes in kv for t in planes)
        if nbytes > self.limit:
            return False
        for key, entry in list(self.entries.items()):  # a saved prefix of this one is superseded
            if len(entry.tokens) <= len(tokens) and tokens[: len(entry.tokens)] == entry.tokens:
                self._drop(key)
        while self.entries and self.nbytes + nbytes > self.limit:
            self._drop(next(iter(self.entries)))
        self.entries[self._next] = CachedPrompt(list(tokens), kv, nbytes)
        self._next += 1
        self.nbytes += nbytes
        return True

    def best(self, prompt: Sequence[int], min_chunk: int, limit: int) -> tuple[int, ReusePlan] | None:
        """The entry that reuses most of ``prompt`` (its key and plan), or None."""
        found: tuple[int, ReusePlan] | None = None
        for key, entry in self.entries.items():
            plan = plan_reuse(entry.tokens, prompt, min_chunk, limit)
            if found is None or plan.reused > found[1].reused:
                found = (key, plan)
        return found

    def take(self, key: int) -> CachedPrompt:
        """The entry, which leaves the cache (it lives in a slot again)."""
        entry = self.entries[key]
        self._drop(key)
        return entry

    def _drop(self, key: int) -> None:
        self.nbytes -= self.entries.pop(key).nbytes
