"""Continuous batching: many sequences, one batched decode step at a time. This is the one
generation driver: the server's engine runs it with ``--parallel`` slots in its worker thread, the
CLIs and tests with one slot in the calling thread (:mod:`.driver`).

Each step the scheduler (1) gives free slots to waiting sequences, reusing the best cached
prefix (a slot's own, blocks another sequence registered, or one from the RAM prompt cache:
``kv_slots.py``), (2) runs prefill chunks of newcomers, about one chunk's worth of tokens in all
(between two decode steps of the others, so their streams keep flowing), and (3) runs one
decode step for every decoding sequence together: tokens [B, 1] at per-sequence positions,
each through its own block table. Sequences join and leave between steps.

The KV cache is one pool of blocks (``block_pool.py``, ``--kv-pool``). A newcomer is admitted
when the pool can hold its prompt; a prompt that begins like one being computed now waits for
those blocks and shares them instead of computing them again (eight users of one character
card). When a growing sequence finds the pool empty, idle slots give their blocks back first;
then the newest running sequence is preempted: its blocks go back and it waits at the head of
the queue to be recomputed (vLLM's recompute preemption), its text so far kept.

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
from ..model.graphs import DecodeGraphs, unsupported
from ..model.kv_cache import DEFAULT_BLOCK_SIZE
from ..sampling.batched import sample_batch
from .block_pool import BlockPool
from .kv_slots import Slot, SlotCache
from .sequence import Feed, SequenceRun, common_prefix

log = logging.getLogger(__name__)

PREFILL_CHUNK = 256  # prompt tokens per forward pass (abort is checked between chunks)
LOGPROBS_CHUNK = 64  # ... when every position's logits are kept


AUTO_SLOTS_MAX = 4
AUTO_MEMORY_SHARE = 0.25  # of the free memory, for the KV cache of automatically sized slots
AUTO_POOL_SHARE = 0.5  # of the free memory, at most, for the default pool


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


def pool_blocks(lm: LoadedModel, slots: int, pool_tokens: int, block_size: int) -> int:
    """Blocks in the pool: ``pool_tokens`` (0: every slot's full context, at most half the free
    memory), never fewer than one full context and a block to copy into."""
    row = -(-lm.context // block_size)
    if pool_tokens > 0:
        n = -(-pool_tokens // block_size)
    else:
        fit = int(AUTO_POOL_SHARE * free_memory_bytes(torch.device(lm.device))) // (
            lm.model.kv_bytes_per_token() * block_size)
        n = min(slots * row, fit)
    return max(n, row + 1)


@dataclass
class SchedulerConfig:
    slots: int = 1
    cache_reuse: int = 32  # smallest moved chunk reused beyond the common prefix; 0 = prefix only
    context_shift: bool = True
    n_keep: int = -1  # tokens kept at the head on a context shift; -1 = the BOS token if any
    cache_ram_bytes: int = 1 << 30  # RAM prompt cache budget; 0 = off
    pool_tokens: int = 0  # KV pool size in tokens; 0 = automatic (see pool_blocks)
    block_size: int = DEFAULT_BLOCK_SIZE
    decode_graphs: bool | None = None  # padded decode steps as CUDA graphs; None = on a CUDA device (see model/graphs.py)


@dataclass
class Task:
    """One sequence: a prompt and its run, and where its output goes."""

    run: SequenceRun
    on_text: Callable[[str], None]
    on_end: Callable[[BaseException | None], None]
    should_abort: Callable[[], bool]
    slot: Slot | None = None
    done_prefill: int = 0  # tokens of ``tokens`` in the slot
    feed: Feed | None = None
    t0: float = field(default_factory=time.perf_counter)
    resume: tuple[list[int], Feed] | None = None  # preempted while decoding: what it held, and its next feed
    admitted: int = 0  # admission order

    @property
    def prompt(self) -> list[int]:
        return self.run.prompt

    @property
    def tokens(self) -> list[int]:
        """What the slot must hold before the next decode step: the prompt, or after a preemption all
        that the sequence held."""
        return self.resume[0] if self.resume is not None else self.run.prompt

    @property
    def reusable(self) -> bool:
        return self.cache_prompt and not self.prompt_logprobs

    @property
    def limit(self) -> int:
        """How much of ``tokens`` may come from the cache (the last prompt token always runs)."""
        if self.resume is not None:
            return len(self.resume[0])
        return len(self.prompt) - 1 if self.reusable else 0

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
        model = lm.model
        graphs = cfg.decode_graphs if cfg.decode_graphs is not None else lm.device.type == "cuda"
        why = unsupported(model, cfg.slots) if graphs else None
        if why is not None:
            if cfg.decode_graphs:
                raise ValueError(f"decode graphs: {why}")
            graphs = False
        n_blocks = pool_blocks(lm, cfg.slots, cfg.pool_tokens, cfg.block_size) + int(graphs)  # + the padding rows' block
        kv = model.kv
        if kv is None or (kv.n_blocks, kv.block_size, model.max_seq) != (n_blocks, cfg.block_size, lm.context):
            model.setup_caches(cfg.slots, lm.context, n_blocks=n_blocks, block_size=cfg.block_size, lazy=True)
        assert model.kv is not None
        self.pool = BlockPool(n_blocks, cfg.block_size, model.kv.zero_block, model.kv.copy_block)
        self.cache = SlotCache(model, cfg.slots, self.pool, cfg.cache_reuse, cfg.cache_ram_bytes)
        self.graphs = DecodeGraphs(model, self.pool.reserve()) if graphs else None
        self.waiting: deque[Task] = deque()
        self.active: list[Task] = []
        self.decode_steps = 0
        self.peak_batch = 0  # the most sequences one decode step has carried
        self.preemptions = 0
        self._admitted = 0
        tok = lm.tokenizer
        self.n_keep = cfg.n_keep if cfg.n_keep >= 0 else int(tok.add_bos and tok.bos_id is not None)
        log.info("KV pool: %d blocks of %d tokens (%.0f MiB)", n_blocks, cfg.block_size,
                 n_blocks * cfg.block_size * model.kv_bytes_per_token() / 2**20)

    @property
    def slots(self) -> list[Slot]:
        return self.cache.slots

    @property
    def ram(self):
        return self.cache.ram

    # --- state ---------------------------------------------------------------------------------
    def free_slots(self) -> int:
        return len(self.cache.free_slots())

    def idle(self) -> bool:
        return not self.active and not self.waiting

    def add(self, task: Task) -> None:
        self.waiting.append(task)

    # --- one step ------------------------------------------------------------------------------
    def step(self) -> None:
        """Admit, prefill chunks of newcomers (about one chunk's worth of tokens), one batched decode step."""
        self._drop_aborted()
        while self.waiting and self.free_slots():
            task = self.waiting[0]
            if not self._admit(task):
                if self.active:
                    break  # it waits for blocks to come back
                self.waiting.popleft()  # pragma: no cover - the pool holds a full context and a block more
                self._end(task, RuntimeError(f"the KV pool ({self.pool.n_blocks} blocks) cannot hold this prompt"))
                continue
            self.waiting.popleft()
        budget = PREFILL_CHUNK  # prompt tokens per step, over as many newcomers as it covers
        for t in [t for t in self.active if t.feed is None]:
            if budget <= 0:
                break
            if t in self.active:  # not preempted by an older one's prefill
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
            self.cache.discard(task.slot)  # what the failed pass wrote is not trusted
        self._end(task, exc)

    def _drop_aborted(self) -> None:
        for t in list(self.waiting):
            if t.should_abort():
                self.waiting.remove(t)
                if not t.run.done:
                    if t.resume is None:
                        t.run.end_prompt(0.0)
                    self._emit(t, t.run.finish("abort"))
                t.on_end(None)
        for t in list(self.active):
            if t.should_abort():
                self._emit(t, t.run.finish("abort"))
                self._end(t, None)

    # --- admission, blocks, preemption ---------------------------------------------------------
    def _admit(self, task: Task) -> bool:
        """Give ``task`` a slot holding as much of its tokens as can be reused; False when the pool
        cannot hold them now (it waits)."""
        claimed = self.cache.claim(task.tokens, task.limit)
        if claimed is None:
            return False
        task.slot, reused = claimed
        task.done_prefill = reused
        if task.resume is None:
            task.t0 = time.perf_counter()  # prefill time counts from here, not from the queue
            task.run.choice.cached_tokens = reused
        self._admitted += 1
        task.admitted = self._admitted
        self.active.append(task)
        return True

    def _blocks(self, task: Task, start: int, stop: int) -> bool:
        """Blocks for ``task``'s positions ``start .. stop-1``, preempting newer sequences if need be;
        False when ``task`` itself had to wait (it was preempted)."""
        assert task.slot is not None
        while not self.cache.writable(task.slot, start, stop):
            victim = max((t for t in self.active if t.slot is not None), key=lambda t: t.admitted)
            self._preempt(victim)
            if victim is task:
                return False
        return True

    def _preempt(self, task: Task) -> None:
        """Give back ``task``'s blocks and queue it first, to be recomputed."""
        slot = task.slot
        assert slot is not None
        if task.feed is not None:  # (one preempted in its prefill starts it again, or its resumption)
            task.resume = (list(slot.tokens), task.feed)
        task.feed = None
        self.cache.discard(slot)
        slot.busy, task.slot, task.done_prefill = False, None, 0
        self.active.remove(task)
        self.waiting.appendleft(task)
        self.preemptions += 1
        log.info("KV pool full: a sequence holding %d tokens waits to be recomputed", len(task.tokens))

    # --- prefill -------------------------------------------------------------------------------
    def _waits_for_shared(self, task: Task) -> bool:
        """Whether an older sequence is computing the blocks ``task`` would compute next (it will
        share them instead)."""
        assert task.slot is not None
        if not task.reusable or task.resume is not None or not self.cache.can_adopt(task.slot):
            return False
        bs = self.pool.block_size
        for other in self.active:
            if other is task or other.admitted > task.admitted or other.feed is not None or not other.reusable \
                    or other.slot is None or other.slot.exact < other.done_prefill:
                continue
            shared = min(common_prefix(other.prompt, task.prompt), task.limit) // bs * bs
            if other.done_prefill < shared and task.done_prefill + bs <= shared:
                return True
        return False

    def _prefill(self, task: Task) -> int:
        """One chunk of ``task``'s prompt; returns the tokens computed."""
        slot = task.slot
        assert slot is not None
        tokens, run = task.tokens, task.run
        if task.resume is not None:
            end = len(tokens)
        else:
            end = len(tokens) - 1 if run.max_new > 0 or task.prompt_logprobs else task.done_prefill
        if task.reusable and task.resume is None:
            gained = self.cache.adopt(slot, tokens, task.limit)
            if gained:
                task.done_prefill += gained
                run.choice.cached_tokens += gained
            elif task.done_prefill < end and self._waits_for_shared(task):
                return 0
        # One chunk size whoever else is running: the same prompt gets the same cache bits, so the
        # same request gives the same text alone or in a batch (a 256-token chunk stalls the
        # other streams for about half a second on a 2-core CPU with the default model).
        chunk = LOGPROBS_CHUNK if task.prompt_logprobs else PREFILL_CHUNK
        start = task.done_prefill
        stop = min(start + chunk, end)
        if stop > start:
            if not self._blocks(task, start, stop):
                return 0
            ids = tokens[start:stop]
            t = torch.tensor([ids], dtype=torch.long, device=self.lm.device)
            pos = torch.arange(start, stop, device=self.lm.device)
            out = self.lm.model(t, pos, kv_len=stop, last_only=not task.prompt_logprobs, tables=[slot.table])
            self.cache.wrote(slot, tokens[:stop], start)
            task.done_prefill = stop
            if task.prompt_logprobs:
                run.prompt_logits(out[0], start)
        if task.done_prefill < end:
            return stop - start
        if task.resume is not None:
            task.feed, task.resume = task.resume[1], None
            return max(0, stop - start)
        task.feed = run.end_prompt(time.perf_counter() - task.t0, task.prompt_logprobs)
        if task.feed is None:
            self._end(task, None)
        return max(0, stop - start)

    # --- decode --------------------------------------------------------------------------------
    def _decode(self, tasks: list[Task]) -> None:
        ctx = self.lm.context
        for t in tasks:
            assert t.slot is not None and t.feed is not None
            if t.feed.drop:
                self.cache.set_tokens(t.slot, t.slot.tokens[: len(t.slot.tokens) - t.feed.drop])
                t.feed.drop = 0
            if len(t.slot.tokens) >= ctx and not self._shift(t):
                self._emit(t, t.run.finish("length"))
                self._end(t, None)
        for t in sorted((t for t in tasks if t.slot is not None), key=lambda t: t.admitted):
            if t.slot is not None:  # (an older one's growth may have preempted it)
                n = len(t.slot.tokens)
                self._blocks(t, n, n + 1)
        batch = [t for t in tasks if t.slot is not None and t.feed is not None]
        if not batch:
            return
        at = [len(t.slot.tokens) for t in batch]  # type: ignore[union-attr]
        tables = [t.slot.table for t in batch]  # type: ignore[union-attr]
        if self.graphs is not None:
            logits = self.graphs([t.feed.token for t in batch], at, tables)  # type: ignore[union-attr]
        else:
            dev = self.lm.device
            tokens = torch.tensor([[t.feed.token] for t in batch], dtype=torch.long, device=dev)  # type: ignore[union-attr]
            pos = torch.tensor([[p] for p in at], dtype=torch.long, device=dev)
            logits = self.lm.model(tokens, pos, kv_len=max(at) + 1, lengths=[p + 1 for p in at], tables=tables)[:, -1]
        self.decode_steps += 1
        self.peak_batch = max(self.peak_batch, len(batch))
        chosen = self._sample(logits, batch)
        for i, t in enumerate(batch):
            slot = t.slot
            assert slot is not None and t.feed is not None
            n = len(slot.tokens)
            self.cache.wrote(slot, slot.tokens + [t.feed.token], n)
            piece, t.feed = t.run.step(logits[i], chosen[i])
            self._emit(t, piece)
            if t.feed is None:
                self._end(t, None)

    def _sample(self, logits: torch.Tensor, batch: list[Task]) -> list[int | None]:
        """The rows the batch sampler takes, sampled where the logits are (one transfer); None
        for a row its run samples on the host."""
        rows = [t.run.batch_row(logits.device) for t in batch]
        idx = [i for i, r in enumerate(rows) if r is not None]
        chosen: list[int | None] = [None] * len(batch)
        if idx:
            part = logits if len(idx) == len(batch) else logits[idx]
            for i, tok in zip(idx, sample_batch(part, [rows[i] for i in idx])):  # type: ignore[misc]
                chosen[i] = tok
        return chosen

    def _shift(self, task: Task) -> bool:
        """Context shift: drop half of what follows the kept head; False when it cannot."""
        slot = task.slot
        assert slot is not None
        n = len(slot.tokens)
        keep = min(self.n_keep, n - 2)
        discard = (n - keep) // 2
        if not self.cfg.context_shift or discard <= 0 or not self.cache.shift(slot, keep, discard):
            return False
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
        return self.cache.info(self.lm.context)

    def pool_info(self) -> dict:
        st = self.pool.stats()
        return {"block_size": st.block_size, "blocks_total": st.total, "blocks_free": st.free,
                "blocks_cached": st.cached, "blocks_held": st.held, "blocks_shared": st.shared,
                "blocks_running": len({b for t in self.active if t.slot is not None for b in t.slot.table}),
                "preemptions": self.preemptions}
