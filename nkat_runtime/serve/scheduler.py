"""Continuous batching: many sequences, one batched decode step at a time. This is the one
generation driver: the server's engine runs it with ``--parallel`` slots in its worker thread, the
CLIs and tests with one slot in the calling thread (:mod:`.driver`).

Each step the scheduler (1) gives free slots to waiting sequences, reusing the best cached
prefix (a slot's own, or one from the RAM prompt cache), (2) runs prefill chunks of newcomers,
about one chunk's worth of tokens in all (between two decode steps of the others, so their
streams keep flowing), and (3) runs one
decode step for every decoding sequence together: tokens [B, 1] at per-sequence positions in
per-sequence cache rows. Sequences join and leave between steps.

A sequence that reaches the end of its slot's context drops the oldest tokens after the first
``n_keep`` and goes on (context shift), unless shifting is off: then it ends with "length".

It knows nothing of HTTP or jobs: a :class:`Task` carries a :class:`SequenceRun` and
callbacks for its text and its end; the engine turns those into events.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..loader import LoadedModel
from .kv_slots import PromptCache, ReusePlan, Slot, plan_reuse
from .sequence import Feed, SequenceRun

log = logging.getLogger(__name__)

SAVE_MIN_TOKENS = 32  # slots holding fewer tokens are not worth a RAM copy
PREFILL_CHUNK = 256  # prompt tokens per forward pass (abort is checked between chunks)
LOGPROBS_CHUNK = 64  # ... when every position's logits are kept


AUTO_SLOTS_MAX = 4
AUTO_MEMORY_SHARE = 0.25  # of the free memory, for the KV cache of automatically sized slots


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def auto_slots(lm: LoadedModel) -> int:
    """Slots whose KV cache fits a quarter of the free memory, 1 .. 4 (llama.cpp's default is 4)."""
    per_slot = lm.model.kv_bytes_per_token() * lm.context
    fit = int(AUTO_MEMORY_SHARE * free_memory_bytes(torch.device(lm.device)) // max(1, per_slot))
    n = max(1, min(AUTO_SLOTS_MAX, fit))
    log.info("%d slot(s): %.0f MiB of KV cache each", n, per_slot / 2**20)
    return n


@dataclass
class SchedulerConfig:
    slots: int = 1
    cache_reuse: int = 32  # smallest moved chunk reused beyond the common prefix; 0 = prefix only
    context_shift: bool = True
    n_keep: int = -1  # tokens kept at the head on a context shift; -1 = the BOS token if any
    cache_ram_bytes: int = 1 << 30  # RAM prompt cache budget; 0 = off


@dataclass
class Task:
    """One sequence: a prompt and its run, and where its output goes."""

    run: SequenceRun
    on_text: Callable[[str], None]
    on_end: Callable[[BaseException | None], None]
    should_abort: Callable[[], bool]
    slot: Slot | None = None
    done_prefill: int = 0  # prompt tokens in the slot
    feed: Feed | None = None
    t0: float = field(default_factory=time.perf_counter)

    @property
    def prompt(self) -> list[int]:
        return self.run.prompt

    @property
    def prompt_logprobs(self) -> bool:
        return self.run.params.prompt_logprobs

    @property
    def cache_prompt(self) -> bool:
        return self.run.params.cache_prompt


class Scheduler:
    def __init__(self, lm: LoadedModel, cfg: SchedulerConfig) -> None:
        if cfg.slots < 1:
            raise ValueError("at least one slot is needed")
        self.lm, self.cfg = lm, cfg
        if lm.model.max_batch != cfg.slots:
            lm.model.setup_caches(cfg.slots, lm.context)
        self.slots = [Slot(i) for i in range(cfg.slots)]
        self.ram = PromptCache(cfg.cache_ram_bytes)
        self.waiting: deque[Task] = deque()
        self.active: list[Task] = []
        self.decode_steps = 0
        self.peak_batch = 0  # the most sequences one decode step has carried
        tok = lm.tokenizer
        self.n_keep = cfg.n_keep if cfg.n_keep >= 0 else int(tok.add_bos and tok.bos_id is not None)

    # --- state ---------------------------------------------------------------------------------
    def free_slots(self) -> int:
        return sum(not s.busy for s in self.slots)

    def idle(self) -> bool:
        return not self.active and not self.waiting

    def add(self, task: Task) -> None:
        self.waiting.append(task)

    # --- one step ------------------------------------------------------------------------------
    def step(self) -> None:
        """Admit, prefill chunks of newcomers (about one chunk's worth of tokens), one batched decode step."""
        self._drop_aborted()
        while self.waiting and self.free_slots():
            self._admit(self.waiting.popleft())
        budget = PREFILL_CHUNK  # prompt tokens per step, over as many newcomers as it covers
        for t in [t for t in self.active if t.feed is None]:
            if budget <= 0:
                break
            budget -= self._guarded(t, self._prefill)
        decoding = [t for t in self.active if t.feed is not None]
        if decoding:
            try:
                self._decode(decoding)
            except Exception as exc:  # a failed batch fails its sequences, not the server
                log.exception("decode step failed")
                for t in decoding:
                    self._fail(t, exc)

    def _guarded(self, task: Task, fn: Callable[[Task], int]) -> int:
        try:
            return fn(task)
        except Exception as exc:
            log.exception("prefill failed")
            self._fail(task, exc)
            return 0

    def _fail(self, task: Task, exc: BaseException) -> None:
        if task.slot is not None:
            task.slot.tokens.clear()  # what the failed pass wrote is not trusted
        self._end(task, exc)

    def _drop_aborted(self) -> None:
        for t in list(self.waiting):
            if t.should_abort():
                self.waiting.remove(t)
                t.run.end_prompt(0.0)
                self._emit(t, t.run.finish("abort"))
                t.on_end(None)
        for t in list(self.active):
            if t.should_abort():
                self._emit(t, t.run.finish("abort"))
                self._end(t, None)

    # --- admission: a slot and its reuse -------------------------------------------------------
    def _admit(self, task: Task) -> None:
        prompt = task.prompt
        reusable = task.cache_prompt and not task.prompt_logprobs
        limit = len(prompt) - 1 if reusable else 0  # the last prompt token is always run
        free = [s for s in self.slots if not s.busy]
        plans = {s.row: plan_reuse(s.tokens, prompt, self.cfg.cache_reuse, limit) for s in free}
        slot = max(free, key=lambda s: (plans[s.row].reused, -s.last_used))
        plan = plans[slot.row]
        from_ram = self.ram.best(prompt, self.cfg.cache_reuse, limit) if len(self.ram) else None
        if from_ram is not None and from_ram[1].reused > plan.reused:
            slot = min(free, key=lambda s: (plans[s.row].reused, s.last_used))  # the least useful slot
            self._save(slot, 0)  # replaced whole: keep it if it is worth keeping
            entry = self.ram.take(from_ram[0])
            self.lm.model.write_kv(slot.row, entry.kv, len(entry.tokens))
            slot.tokens = entry.tokens
            plan = from_ram[1]
            log.info("slot %d: restored %d cached tokens from RAM", slot.row, len(entry.tokens))
        else:
            self._save(slot, plan.reused)
        slot.busy, slot.last_used = True, time.monotonic()
        task.slot = slot
        task.t0 = time.perf_counter()  # prefill time counts from here, not from the queue
        self._apply(slot, plan, prompt)
        task.done_prefill = plan.reused
        task.run.choice.cached_tokens = plan.reused
        self.active.append(task)

    def _save(self, slot: Slot, reused: int) -> None:
        """Copy the slot to the RAM cache when the newcomer would throw most of it away."""
        if self.ram.limit <= 0 or len(slot.tokens) < SAVE_MIN_TOKENS or reused * 2 >= len(slot.tokens):
            return
        if self.ram.save(slot.tokens, self.lm.model.read_kv(slot.row, len(slot.tokens))):
            log.info("slot %d: %d tokens saved to the RAM cache (%d entries, %.0f MiB)", slot.row,
                     len(slot.tokens), len(self.ram), self.ram.nbytes / 2**20)

    def _apply(self, slot: Slot, plan: ReusePlan, prompt: list[int]) -> None:
        for src, dst, n in plan.moves:
            self.lm.model.shift_kv(slot.row, src, dst, n)
        slot.tokens = prompt[: plan.reused]
        if plan.moves:
            log.info("slot %d: reused %d prompt tokens (%d as a prefix, %d in %d moved chunks)", slot.row,
                     plan.reused, plan.prefix, plan.reused - plan.prefix, len(plan.moves))

    # --- prefill -------------------------------------------------------------------------------
    def _prefill(self, task: Task) -> int:
        """One chunk of ``task``'s prompt; returns the tokens computed."""
        assert task.slot is not None
        prompt, run = task.prompt, task.run
        end = len(prompt) - 1 if run.max_new > 0 or task.prompt_logprobs else task.done_prefill
        # One chunk size whoever else is running: the same prompt gets the same cache bits, so the
        # same request gives the same text alone or in a batch (a 256-token chunk stalls the
        # other streams for about half a second on a 2-core CPU with the default model).
        chunk = LOGPROBS_CHUNK if task.prompt_logprobs else PREFILL_CHUNK
        start = task.done_prefill
        stop = min(start + chunk, end)
        if stop > start:
            ids = prompt[start:stop]
            tokens = torch.tensor([ids], dtype=torch.long, device=self.lm.device)
            pos = torch.arange(start, stop, device=self.lm.device)
            out = self.lm.model(tokens, pos, kv_len=stop, last_only=not task.prompt_logprobs, rows=[task.slot.row])
            task.slot.tokens = prompt[:stop]
            task.done_prefill = stop
            if task.prompt_logprobs:
                run.prompt_logits(out[0], start)
        if task.done_prefill < end:
            return stop - start
        task.feed = run.end_prompt(time.perf_counter() - task.t0, task.prompt_logprobs)
        if task.feed is None:
            self._end(task, None)
        return max(0, stop - start)

    # --- decode --------------------------------------------------------------------------------
    def _decode(self, tasks: list[Task]) -> None:
        ctx = self.lm.context
        batch: list[Task] = []
        for t in tasks:
            assert t.slot is not None and t.feed is not None
            if t.feed.drop:
                del t.slot.tokens[len(t.slot.tokens) - t.feed.drop :]
            if len(t.slot.tokens) >= ctx and not self._shift(t):
                self._emit(t, t.run.finish("length"))
                self._end(t, None)
                continue
            batch.append(t)
        if not batch:
            return
        batch.sort(key=lambda t: t.slot.row)  # type: ignore[union-attr]  # consecutive rows are read as a view
        dev = self.lm.device
        tokens = torch.tensor([[t.feed.token] for t in batch], dtype=torch.long, device=dev)  # type: ignore[union-attr]
        pos = torch.tensor([[len(t.slot.tokens)] for t in batch], dtype=torch.long, device=dev)  # type: ignore[union-attr]
        logits = self.lm.model(tokens, pos, kv_len=int(pos.max()) + 1, rows=[t.slot.row for t in batch])[:, -1]  # type: ignore[union-attr]
        self.decode_steps += 1
        self.peak_batch = max(self.peak_batch, len(batch))
        for i, t in enumerate(batch):
            t.slot.tokens.append(t.feed.token)  # type: ignore[union-attr]
            piece, t.feed = t.run.step(logits[i])
            self._emit(t, piece)
            if t.feed is None:
                self._end(t, None)

    def _shift(self, task: Task) -> bool:
        """Context shift: drop half of what follows the kept head; False when it cannot."""
        slot = task.slot
        assert slot is not None
        n = len(slot.tokens)
        keep = min(self.n_keep, n - 2)
        discard = (n - keep) // 2
        if not self.cfg.context_shift or discard <= 0:
            return False
        self.lm.model.shift_kv(slot.row, keep + discard, keep, n - keep - discard)
        slot.tokens = slot.tokens[:keep] + slot.tokens[keep + discard :]
        log.info("slot %d: context shift, %d tokens dropped after the first %d", slot.row, discard, keep)
        return True

    # --- ends ----------------------------------------------------------------------------------
    def _emit(self, task: Task, piece: str) -> None:
        if piece:
            task.on_text(piece)

    def _end(self, task: Task, error: BaseException | None) -> None:
        if task in self.active:
            self.active.remove(task)
        if task.slot is not None:
            task.slot.busy = False
            task.slot.last_used = time.monotonic()
            task.slot = None
        if not task.run.done:
            task.run.finish("abort" if error is not None else None)
        task.on_end(error)

    def slot_info(self) -> list[dict]:
        return [{"id": s.row, "n_ctx": self.lm.context, "is_processing": s.busy, "n_cached": len(s.tokens)}
                for s in self.slots]
