"""The engine: owns the loaded model, a bounded queue of jobs, and the worker that runs them.

Generation runs off the caller's event loop, in one worker thread; events reach the caller's
asyncio loop through ``call_soon_threadsafe``. A job holds all its choices (``n`` x prompts);
each choice is one sequence for the :class:`~nkat_runtime.serve.scheduler.Scheduler`, which decodes
every running sequence in one batched step (continuous batching over ``slots`` KV-cache rows).
Jobs wait in a bounded queue while every slot is taken. Jobs can be aborted by id
(:meth:`JobHandle.cancel`, e.g. on a client disconnect) or by Kobold ``genkey``
(:meth:`Engine.abort`).

The engine never builds JSON: it speaks :mod:`nkat_runtime.request` types.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
import uuid
from collections import deque
from typing import Any, AsyncIterator, Callable

from ..errors import ServerBusyError
from ..loader import LoadedModel
from ..request import (
    ChatOptions,
    Choice,
    EngineStats,
    GenerationEvent,
    GenerationOutcome,
    GenerationRequest,
    TokenLogprob,
)
from ..sampling.chain import make_generator
from .chat import chat_prompt
from .embedding import embed
from .observer import NoObserver, Observer
from .prepare import Prepared, Preparer
from .scheduler import Scheduler, SchedulerConfig, Task
from .sequence import SequenceRun

log = logging.getLogger(__name__)


class Job:
    def __init__(self, prepared: Prepared, loop: asyncio.AbstractEventLoop) -> None:
        self.id = uuid.uuid4().hex
        self.prepared = prepared
        self.genkey = prepared.request.genkey
        self.loop = loop
        self.events: asyncio.Queue[GenerationEvent] = asyncio.Queue()
        self.aborted = threading.Event()
        self.partial = ""  # text of choice 0 so far (Kobold's generate/check)
        self.outcome: GenerationOutcome | None = None
        self.logprobs: list[TokenLogprob] | None = None
        self.left = 0  # sequences not yet ended
        self.failed = False
        self.submitted = time.perf_counter()
        self.last_piece: dict[int, float] = {}  # per choice: when its last piece of text went out

    def emit(self, event: GenerationEvent) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


class JobHandle:
    """The caller's side of a job: its events, its result, and a way to cancel it."""

    def __init__(self, engine: "Engine", job: Job) -> None:
        self._engine, self._job = engine, job

    @property
    def id(self) -> str:
        return self._job.id

    @property
    def prepared(self) -> Prepared:
        return self._job.prepared

    async def events(self) -> AsyncIterator[GenerationEvent]:
        """Events until (and including) "done" or "error"."""
        while True:
            event = await self._job.events.get()
            yield event
            if event.kind in ("done", "error"):
                return

    async def result(self) -> GenerationOutcome:
        """Wait for the whole outcome; an "error" event is raised."""
        async for event in self.events():
            if event.kind == "error":
                assert event.error is not None
                raise event.error
            if event.kind == "done":
                assert event.outcome is not None
                return event.outcome
        raise RuntimeError("the job ended without an outcome")  # pragma: no cover

    def cancel(self) -> None:
        self._engine.cancel(self._job)


class Engine:
    def __init__(self, lm: LoadedModel, *, max_queue: int = 6, default_max_tokens: int = 512,
                 config: SchedulerConfig | None = None, chat_defaults: ChatOptions | None = None,
                 observer: Observer | None = None) -> None:
        if max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        self.lm = lm
        self.max_queue = max_queue
        self.default_max_tokens = default_max_tokens
        self.config = config or SchedulerConfig()
        self.sched = Scheduler(lm, self.config)
        self.preparer = Preparer(lm, default_max_tokens, context_shift=self.config.context_shift,
                                 chat_defaults=chat_defaults)
        self.stats = EngineStats()
        self.observer = observer or NoObserver()
        self._cond = threading.Condition()
        self._pending: deque[Job] = deque()
        self._calls: deque[tuple[Callable[[Scheduler], Any], asyncio.AbstractEventLoop, asyncio.Future]] = deque()
        self._running: list[Job] = []
        self._last: Job | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._worker_main, name="nkat-engine", daemon=True)
        self._thread.start()

    # --- model facts ----------------------------------------------------------------------------
    @property
    def context(self) -> int:
        return self.lm.context

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return self.lm.tokenizer.encode(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, ids: list[int], skip_special: bool = True) -> str:
        return self.lm.tokenizer.decode(ids, skip_special=skip_special)

    def token_bytes(self, token_id: int) -> bytes:
        return self.lm.tokenizer.token_bytes(token_id)

    def batch_stats(self) -> dict:
        """Decode steps so far, the most sequences one step carried, and whether decode is batch-invariant."""
        with self._cond:
            return {"decode_steps": self.sched.decode_steps, "peak_batch": self.sched.peak_batch,
                    "batch_invariant": self.lm.model.batch_invariant}

    def cache_stats(self) -> dict:
        """The KV cache's types, its pool of blocks and their use (``/props``)."""
        model = self.lm.model
        per_token = model.kv_bytes_per_token()
        k, v = model.cache_types
        with self._cond:
            pool = self.sched.pool_info()
        return {"type_k": k, "type_v": v, "bytes_per_token": per_token, "slots": self.config.slots,
                "bytes_total": per_token * pool["block_size"] * pool["blocks_total"], **pool}

    def slot_info(self) -> list[dict]:
        with self._cond:
            return self.sched.slot_info()

    def idle(self) -> bool:
        """Nothing queued, nothing running, every slot free."""
        with self._cond:
            return not self._pending and not self._running and self.sched.idle() and \
                self.sched.free_slots() == len(self.sched.slots)

    # --- jobs -----------------------------------------------------------------------------------
    def prepare(self, req: GenerationRequest) -> Prepared:
        """Tokenise and fit (CPU; thread-safe): call it off the event loop."""
        return self.preparer.prepare(req)

    def apply_template(self, req: GenerationRequest) -> str:
        """The prompt a chat request becomes (messages and tools through the template)."""
        return chat_prompt(self.lm, req, self.preparer.chat_defaults).text

    def _full(self) -> bool:
        """Every free slot is spoken for and ``max_queue`` jobs wait beyond them."""
        room = max(0, self.sched.free_slots() - len(self.sched.waiting))
        return len(self._pending) >= self.max_queue + room

    def is_full(self) -> bool:
        """True when a new job would be turned away (checked before the work of preparing one)."""
        with self._cond:
            return self._closed or self._full()

    def submit(self, prepared: Prepared, loop: asyncio.AbstractEventLoop | None = None) -> JobHandle:
        """Queue a job; :class:`ServerBusyError` when ``max_queue`` jobs already wait."""
        job = Job(prepared, loop or asyncio.get_running_loop())
        with self._cond:
            if self._closed:
                raise ServerBusyError("the server is shutting down")
            if self._full():
                raise ServerBusyError("Server is busy; please try again later.")
            self._pending.append(job)
            self.stats.queued = len(self._pending)
            self._cond.notify_all()
        return JobHandle(self, job)

    def cancel(self, job: Job) -> None:
        """Abort a job: a running one stops at the next step, a queued one ends at once."""
        job.aborted.set()
        with self._cond:
            if job in self._pending:
                self._pending.remove(job)
                self.stats.queued = len(self._pending)
                self._finish_unrun(job)
            self._cond.notify_all()

    def abort(self, genkey: str = "") -> tuple[bool, bool]:
        """Kobold's abort: (success, done). An empty key aborts the running job only when it is
        the only one and nothing waits; a key aborts the running job it names, or the queued one
        (done = False)."""
        with self._cond:
            for job in self._running:
                if (genkey and genkey == job.genkey) or (not genkey and len(self._running) == 1 and not self._pending):
                    job.aborted.set()
                    self._cond.notify_all()
                    return True, True
            if genkey:
                for job in self._pending:
                    if job.genkey == genkey:
                        job.aborted.set()
                        self._pending.remove(job)
                        self.stats.queued = len(self._pending)
                        self._finish_unrun(job)
                        return True, False
            return False, not self._running

    def _visible(self, genkey: str) -> Job | None:
        """The running (or last) job that ``genkey`` may look at, after Kobold's privacy rule."""
        if genkey:
            for job in [*self._running, self._last]:
                if job is not None and job.genkey == genkey:
                    return job
            return None
        if len(self._running) > 1 or self._pending:
            return None
        job = self._running[0] if self._running else self._last
        return job if job is not None and not job.genkey else None

    def check(self, genkey: str = "") -> str:
        """The text generated so far by the running job (Kobold's ``generate/check``)."""
        with self._cond:
            job = self._visible(genkey)
            return job.partial if job is not None else ""

    def last_logprobs(self, genkey: str = "") -> list[TokenLogprob] | None:
        with self._cond:
            job = self._visible(genkey)
            return job.logprobs if job is not None else None

    # --- other work in the engine thread ---------------------------------------------------------
    async def call(self, fn: Callable[[Scheduler], Any]) -> Any:
        """``fn(scheduler)`` run in the engine thread between two scheduler steps; its result, or
        its exception, comes back here."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._cond:
            if self._closed:
                raise ServerBusyError("the server is shutting down")
            self._calls.append((fn, loop, fut))
            self._cond.notify_all()
        return await fut

    async def embed(self, inputs: list[list[int]], pooling: str = "mean", normalize: bool = True) -> list[list[float]]:
        """Each token sequence's pooled embedding (:mod:`.embedding`), one engine call per input so
        decode steps run between them."""
        return [await self.call(lambda sched, ids=ids: embed(sched, ids, pooling, normalize)) for ids in inputs]

    def _run_calls(self, calls: list) -> None:
        for fn, loop, fut in calls:
            try:
                value, error = fn(self.sched), None
            except Exception as exc:  # noqa: BLE001 - it goes back to the caller
                value, error = None, exc
            loop.call_soon_threadsafe(_settle, fut, value, error)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            while self._calls:
                _, loop, fut = self._calls.popleft()
                loop.call_soon_threadsafe(_settle, fut, None, ServerBusyError("the server is shutting down"))
            for job in list(self._pending):
                job.aborted.set()
                self._finish_unrun(job)
            self._pending.clear()
            for job in self._running:
                job.aborted.set()
            self._cond.notify_all()
        self._thread.join(timeout=30)

    # --- the worker -----------------------------------------------------------------------------
    def _finish_unrun(self, job: Job) -> None:
        outcome = self._outcome(job)
        for pi, pp in enumerate(job.prepared.prompts):
            for k in range(job.prepared.request.n):
                outcome.choices.append(Choice(pi * job.prepared.request.n + k, stop_kind="abort", prompt_text=pp.text,
                                              prompt_tokens=len(pp.ids)))
        job.outcome = outcome
        job.emit(GenerationEvent("done", outcome=outcome))

    @staticmethod
    def _outcome(job: Job) -> GenerationOutcome:
        p = job.prepared
        outcome = GenerationOutcome(id=job.id, seed=p.seed, max_tokens=p.max_tokens, warnings=p.warnings,
                                    truncated_tokens=p.truncated_tokens)
        outcome.prompt_tokens = sum(len(pp.ids) for pp in p.prompts)
        return outcome

    def _worker_main(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._calls and self.sched.idle() and not self._closed:
                    self._cond.wait()
                if self._closed and self.sched.idle():
                    return
                calls = list(self._calls)
                self._calls.clear()
                while self._pending and self.sched.free_slots() > len(self.sched.waiting):
                    job = self._pending.popleft()
                    self._running.append(job)
                    self._start(job)
                self.stats.queued, self.stats.busy = len(self._pending), bool(self._running)
            self._run_calls(calls)
            try:
                self.sched.step()
            except BaseException:  # pragma: no cover - the scheduler reports failures per sequence
                log.exception("scheduler step failed")

    def _start(self, job: Job) -> None:
        p, req = job.prepared, job.prepared.request
        job.outcome = self._outcome(job)
        job.left = len(p.prompts) * req.n
        for pi, pp in enumerate(p.prompts):
            params = dataclasses.replace(p.gen, max_new=pp.max_new)
            for k in range(req.n):
                index = pi * req.n + k
                run = SequenceRun(self.lm, pp.ids, params, make_generator(p.seed + index))
                run.choice.index, run.choice.prompt_text = index, pp.text
                self.sched.add(Task(run, self._text_sink(job, index), self._end_sink(job, index, run.choice),
                                    job.aborted.is_set))

    def _text_sink(self, job: Job, index: int):
        def on_text(piece: str) -> None:
            now = time.perf_counter()
            last = job.last_piece.get(index)
            if last is None:
                self.observer.first_token(now - job.submitted)
            else:
                self.observer.next_token(now - last)
            job.last_piece[index] = now
            if index == 0:
                job.partial += piece
            job.emit(GenerationEvent("text", index=index, text=piece))
        return on_text

    def _end_sink(self, job: Job, index: int, choice: Choice):
        def on_end(error: BaseException | None) -> None:
            outcome = job.outcome
            assert outcome is not None
            job.left -= 1
            if error is not None and not job.failed:
                job.failed = True
                job.aborted.set()
                job.emit(GenerationEvent("error", error=error))
            if not job.failed:
                outcome.choices.append(choice)
                outcome.completion_tokens += choice.completion_tokens
                outcome.prefill_seconds += choice.prefill_seconds
                outcome.decode_seconds += choice.decode_seconds
                with self._cond:
                    self._record(choice, job.prepared.seed + index)
                job.emit(GenerationEvent("choice", index=index, choice=choice))
            if job.left == 0:
                self._finish(job)
        return on_end

    def _finish(self, job: Job) -> None:
        outcome = job.outcome
        assert outcome is not None
        outcome.choices.sort(key=lambda c: c.index)
        req = job.prepared.request
        if req.logprobs is not None:
            job.logprobs = [lp for c in outcome.choices for lp in (c.logprobs or [])]
        with self._cond:
            self._running.remove(job)
            self._last = job
            self.stats.busy = bool(self._running)
            self.stats.last_end = time.time()
        # counted before the client hears "done": a scrape right after the response sees the job
        self.observer.job_done(outcome.prompt_tokens, outcome.completion_tokens, job.aborted.is_set())
        if not job.failed:
            job.emit(GenerationEvent("done", outcome=outcome))
        log.info("job %s: %d prompt + %d generated tokens, prefill %.2f s, decode %.2f s%s", job.id[:8],
                 outcome.prompt_tokens, outcome.completion_tokens, outcome.prefill_seconds, outcome.decode_seconds,
                 " (aborted)" if job.aborted.is_set() else "")

    def _record(self, res: Choice, seed: int) -> None:
        s = self.stats
        s.total_gens += 1
        s.last_process_seconds, s.last_eval_seconds = res.prefill_seconds, res.decode_seconds
        s.last_input_count, s.last_token_count = res.prompt_tokens, len(res.token_ids)
        s.last_seed, s.last_stop_kind = seed, res.stop_kind


def _settle(fut: asyncio.Future, value: Any, error: BaseException | None) -> None:
    if fut.done():  # the caller went away
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(value)
