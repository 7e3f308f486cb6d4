"""Slots, what each one holds in the KV block pool, and how a new prompt reuses what is cached.

A slot is one sequence's place: ``tokens`` are the tokens whose keys and values its block
``table`` holds at positions ``0 .. len(tokens)-1`` (``block_pool.py`` owns the blocks; the
storage is ``model/kv_cache.py``). A slot keeps its table when its sequence ends, so the next
prompt in it reuses

* the longest common prefix with what the slot holds (llama.cpp's ``cache_prompt``,
  Kobold.cpp's FastForwarding), and
* beyond it, chunks of at least ``min_chunk`` tokens that reappear at an earlier place (an old
  exchange was dropped from a chat): their entries are moved down and their keys re-rotated
  to the new positions (llama.cpp's ``--cache-reuse``, Kobold.cpp's ContextShift on a prompt);

or, when it is longer, the prefix another sequence registered in the pool (``BlockPool.lookup``:
the blocks are shared, not copied), or an entry of the RAM prompt cache.

A moved chunk's entries were computed while the dropped tokens were still in view, so its
continuation is close to, not equal to, a full prefill; the same holds for context shift. So a
slot tracks ``exact``: how many leading positions were computed in place from position 0. Only
blocks below it are registered for sharing. Every layer keeps every position here,
sliding-window layers included, so a move is the same re-rotation on every architecture we run.

When the pool runs short, idle slots give their blocks back, least recently used first
(what they held goes to the RAM prompt cache when it is worth keeping).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..model.decoder import DecoderModel
from .block_pool import BlockPool, NoBlocks
from .sequence import common_prefix

log = logging.getLogger(__name__)

SAVE_MIN_TOKENS = 32  # slots holding fewer tokens are not worth a RAM copy


@dataclass
class Slot:
    row: int
    tokens: list[int] = field(default_factory=list)
    table: list[int] = field(default_factory=list)  # block ids
    exact: int = 0  # leading positions computed in place (shareable)
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


class SlotCache:
    """The slots and the block pool under them, the RAM prompt cache beside them."""

    def __init__(self, model: DecoderModel, n_slots: int, pool: BlockPool, min_chunk: int, ram_bytes: int) -> None:
        self.model, self.pool, self.min_chunk = model, pool, min_chunk
        self.slots = [Slot(i) for i in range(n_slots)]
        self.ram = PromptCache(ram_bytes)

    def free_slots(self) -> list[Slot]:
        return [s for s in self.slots if not s.busy]

    # --- claiming a slot for a prompt -------------------------------------------------------------
    def claim(self, prompt: list[int], limit: int) -> tuple[Slot, int] | None:
        """A free slot holding the most of ``prompt[:limit]`` that can be had, and how many tokens it
        holds; None when the pool cannot give the blocks the rest of the prompt needs now."""
        free = self.free_slots()
        plans = {s.row: plan_reuse(s.tokens, prompt, self.min_chunk, limit) for s in free}
        slot = max(free, key=lambda s: (plans[s.row].reused, -s.last_used))
        plan = plans[slot.row]
        shared = self.pool.share(self.pool.lookup(prompt, limit)) if limit else []  # held now: eviction spares them
        n_shared = len(shared) * self.pool.block_size
        from_ram = self.ram.best(prompt, self.min_chunk, limit) if len(self.ram) else None
        ram_reused = from_ram[1].reused if from_ram is not None else 0
        reused = max(plan.reused, n_shared, ram_reused)
        entry = None
        if reused > plan.reused:  # the least useful slot gives up what it holds
            slot = min(free, key=lambda s: (plans[s.row].reused, s.last_used))
            if n_shared < ram_reused:
                assert from_ram is not None
                entry = self.ram.take(from_ram[0])  # before the slot's content may push it out of the RAM cache
            self.replace(slot)
        if reused == plan.reused:  # the slot's own content (ties go to it: nothing moves)
            self.pool.release(shared)
            self._save(slot, plan.reused)
            self._apply(slot, plan, prompt)
        elif n_shared >= ram_reused:
            slot.table, slot.tokens, slot.exact = shared, prompt[:n_shared], n_shared
            log.info("slot %d: shares %d cached prompt tokens (%d blocks)", slot.row, n_shared, len(shared))
        else:
            self.pool.release(shared)
            assert entry is not None and from_ram is not None
            if self._restore(slot, entry):
                self._apply(slot, from_ram[1], prompt)
        # the rest of the prompt, and the first token after it (the slot, idle, keeps what it got)
        if not self.make_room(self.pool.blocks_for(len(prompt) + 1) - len(slot.tokens) // self.pool.block_size,
                              keep=slot):
            return None
        slot.busy, slot.last_used = True, time.monotonic()
        return slot, len(slot.tokens)

    def _restore(self, slot: Slot, entry: CachedPrompt) -> bool:
        n = len(entry.tokens)
        if not self.writable(slot, 0, n):
            self.ram.save(entry.tokens, entry.kv, entry.exact)  # back where it was
            return False
        self.model.write_kv(slot.table, entry.kv, n)
        slot.tokens, slot.exact = entry.tokens, entry.exact
        log.info("slot %d: restored %d cached tokens from RAM", slot.row, n)
        return True

    def _apply(self, slot: Slot, plan: ReusePlan, prompt: list[int]) -> None:
        """Carry out ``plan`` on ``slot`` (the moves it can get blocks for)."""
        reused = plan.prefix
        for src, dst, n in plan.moves:
            if not self.writable(slot, dst, dst + n):
                break
            self.model.shift_kv(slot.table, src, dst, n)
            reused = dst + n
        slot.exact = min(slot.exact, plan.prefix)
        self.set_tokens(slot, prompt[:reused])
        if plan.moves:
            log.info("slot %d: reused %d prompt tokens (%d as a prefix, %d in %d moved chunks)", slot.row,
                     reused, plan.prefix, reused - plan.prefix, len(plan.moves))

    # --- blocks as a sequence grows and shrinks ---------------------------------------------------
    def make_room(self, n: int, keep: Slot | None = None) -> bool:
        """Evict idle slots (least recently used first, never ``keep``) until ``n`` blocks are available."""
        while self.pool.available() < n:
            idle = [s for s in self.slots if not s.busy and s.table and s is not keep]
            if not idle:
                return False
            self.replace(min(idle, key=lambda s: s.last_used))
        return True

    def writable(self, slot: Slot, start: int, stop: int) -> bool:
        """Blocks for positions ``start .. stop-1`` of ``slot``, safe to write (False: none to be had)."""
        if not self.make_room(self.pool.needed(slot.table, start, stop), keep=slot):
            return False
        try:
            self.pool.writable(slot.table, start, stop)
        except NoBlocks:
            return False
        return True

    def wrote(self, slot: Slot, tokens: list[int], start: int) -> None:
        """``slot`` now holds ``tokens``, of which positions from ``start`` were computed now, in
        place; full blocks of an exact prefix are registered for sharing."""
        if slot.exact >= start:
            slot.exact = len(tokens)
        slot.tokens = tokens
        if len(tokens) // self.pool.block_size > start // self.pool.block_size:  # a block was filled
            self.pool.register(slot.table, tokens, slot.exact)

    def set_tokens(self, slot: Slot, tokens: list[int]) -> None:
        """Cut ``slot`` to ``tokens`` (a prefix of what it holds), giving back the blocks past them."""
        slot.tokens = tokens
        slot.exact = min(slot.exact, len(tokens))
        self.pool.truncate(slot.table, len(tokens))

    def adopt(self, slot: Slot, prompt: list[int], limit: int) -> int:
        """Extend an exact, block-aligned ``slot`` with the blocks of ``prompt[:limit]`` that others
        registered since; returns the positions gained."""
        n, bs = len(slot.tokens), self.pool.block_size
        if not self.can_adopt(slot) or limit - n < bs:
            return 0
        found = self.pool.lookup(prompt, limit)
        if len(found) * bs <= n:
            return 0
        old = slot.table
        slot.table = self.pool.share(found)
        self.pool.release(old)
        slot.tokens, slot.exact = prompt[: len(found) * bs], len(found) * bs
        return slot.exact - n

    def can_adopt(self, slot: Slot) -> bool:
        """Whether ``slot`` ends on a block boundary of an exact prefix (where shared blocks can follow)."""
        return len(slot.tokens) % self.pool.block_size == 0 and slot.exact >= len(slot.tokens)

    def shift(self, slot: Slot, keep: int, discard: int) -> bool:
        """Context shift: drop ``discard`` tokens after the first ``keep``; False when no blocks."""
        n = len(slot.tokens)
        if not self.writable(slot, keep, n - discard):
            return False
        self.model.shift_kv(slot.table, keep + discard, keep, n - keep - discard)
        slot.exact = min(slot.exact, keep)
        self.set_tokens(slot, slot.tokens[:keep] + slot.tokens[keep + discard :])
        return True

    # --- ends -------------------------------------------------------------------------------------
    def discard(self, slot: Slot) -> None:
        """Forget what ``slot`` holds (its blocks go back)."""
        self.pool.release(slot.table)
        slot.tokens, slot.exact = [], 0

    def clear(self) -> None:
        """Forget everything cached outside running sequences: idle slots, the RAM cache, blocks
        kept for their prefix."""
        for slot in self.slots:
            if not slot.busy:
                self.discard(slot)
        for key in list(self.ram.entries):
            self.ram.take(key)
        self.pool.forget_cached()

    def replace(self, slot: Slot) -> None:
        """Empty ``slot`` for other content, keeping what it held in RAM when that is worth it."""
        self._save(slot, 0)
        self.discard(slot)

    def _save(self, slot: Slot, reused: int) -> None:
        """Copy the slot to the RAM cache when the newcomer would throw most of it away."""
        if self.ram.limit <= 0 or len(slot.tokens) < SAVE_MIN_TOKENS or reused * 2 >= len(slot.tokens):
            return
        if self.ram.save(slot.tokens, self.model.read_kv(slot.table, len(slot.tokens)), slot.exact):
            log.info("slot %d: %d tokens saved to the RAM cache (%d entries, %.0f MiB)", slot.row,
                     len(slot.tokens), len(self.ram), self.ram.nbytes / 2**20)

    def info(self, n_ctx: int) -> list[dict]:
        refs = self.pool.refs
        return [{"id": s.row, "n_ctx": n_ctx, "is_processing": s.busy, "n_cached": len(s.tokens),
                 "n_blocks": len(s.table), "n_blocks_shared": sum(refs[b] > 1 for b in s.table)} for s in self.slots]


@dataclass
class CachedPrompt:
    tokens: list[int]
    kv: list[tuple[torch.Tensor, ...]]  # per layer, the cache's planes (K then V) [H_kv, n, ...]
    nbytes: int
    exact: int = 0


class PromptCache:
    """Size-bounded LRU of slot contents in RAM (``limit_bytes`` 0 = off)."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.entries: OrderedDict[int, CachedPrompt] = OrderedDict()
        self._next = 0
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self.entries)

    def save(self, tokens: list[int], kv: list[tuple[torch.Tensor, ...]], exact: int = 0) -> bool:
        nbytes = sum(t.numel() * t.element_size() for planes in kv for t in planes)
        if nbytes > self.limit:
            return False
        for key, entry in list(self.entries.items()):  # a saved prefix of this one is superseded
            if len(entry.tokens) <= len(tokens) and tokens[: len(entry.tokens)] == entry.tokens:
                self._drop(key)
        while self.entries and self.nbytes + nbytes > self.limit:
            self._drop(next(iter(self.entries)))
        self.entries[self._next] = CachedPrompt(list(tokens), kv, nbytes, exact)
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
