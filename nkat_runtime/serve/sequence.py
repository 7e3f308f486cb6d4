"""One sequence's generation after its prompt: sample a token from the logits of the last fed
token, decide what text is safe to show, and name the next token to feed.

:class:`SequenceRun` is a state machine that never calls the model: the scheduler
(:mod:`.scheduler`, the one generation driver, for the server's many sequences and the CLIs' one)
feeds it logits, one decode step at a time, and does what it asks (feed this token, after
dropping that many from the cache tail). It fills a :class:`~nkat_runtime.request.Choice`.

Streaming pieces never split a UTF-8 character and never show a stop string or a banned phrase
(text that might begin one is held back until it is clear). A banned phrase that appears anyway
is undone by backtracking: the tokens from the one where it started are dropped, that token is
banned at that position, and sampling resumes there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Collection, Sequence

import torch

from ..loader import LoadedModel
from ..request import Choice, TokenLogprob
from ..sampling.batched import Row, batchable
from ..sampling.chain import SamplerState, make_generator, sample
from ..sampling.grammar import Constraint
from ..sampling.params import SamplingParams
from ..text.tokenizer import StreamDecoder

MAX_BACKTRACKS = 256  # banned-phrase rollbacks per generation before phrases are ignored


@dataclass
class GenerationParams:
    """What one sequence is asked to do, resolved to token ids (the one parameter set every
    driver passes: the server's preparer builds it from a request, the CLIs from their flags)."""

    max_new: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: Sequence[str] = ()
    stop_ids: Collection[int] | None = None  # None: the tokenizer's end-of-generation tokens
    banned_phrases: Sequence[str] = ()  # undone by backtracking (case-insensitive)
    logprobs: int | None = None  # None: off; N: each token's logprob with N alternatives
    prompt_logprobs: bool = False  # also for the prompt (OpenAI's echo with logprobs)
    include_stop: bool = False  # keep a matched stop string in the text
    skip_special: bool = True  # control tokens are not printed
    cache_prompt: bool = True  # False: reuse nothing cached (llama.cpp's cache_prompt)
    constraint: Callable[[], Constraint] | None = None  # a grammar: makes each sequence's matcher
    shown_ids: frozenset[int] = frozenset()  # control tokens printed anyway (markers the reply parser reads)
    min_tokens: int = 0  # the first this many tokens cannot be end-of-generation tokens


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


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PhraseBans:
    """Case-insensitive banned phrases: where one appears, and how much text could still start one."""

    def __init__(self, phrases: Sequence[str]) -> None:
        self.phrases = sorted({_fold(p) for p in phrases if len(p) > 1}, key=len)
        self.longest = max((len(p) for p in self.phrases), default=0)

    def __bool__(self) -> bool:
        return bool(self.phrases)

    def find(self, text: str, start: int) -> int | None:
        """The earliest index >= ``start - longest + 1`` where a phrase begins."""
        lo = max(0, start - self.longest + 1)
        window = _fold(text[lo:])
        hits = [i for i in (window.find(p) for p in self.phrases) if i >= 0]
        return lo + min(hits) if hits else None

    def hold(self, text: str) -> int:
        """Characters at the end of ``text`` that could be the beginning of a phrase."""
        tail = _fold(text[-self.longest:]) if self.phrases else ""
        best = 0
        for p in self.phrases:
            for n in range(min(len(p) - 1, len(tail)), best, -1):
                if tail.endswith(p[:n]):
                    best = n
                    break
        return best


def _fold(text: str) -> str:
    """Lower case, one character for one (so offsets stay valid)."""
    return "".join(c if len(c.lower()) != 1 else c.lower() for c in text)


def token_logprob(lm: LoadedModel, logp: torch.Tensor, tok: int, top_n: int) -> TokenLogprob:
    tokenizer = lm.tokenizer

    def entry(i: int, value: float | None) -> TokenLogprob:
        raw = tokenizer.token_bytes(i)
        return TokenLogprob(i, raw.decode("utf-8", errors="replace"), value, list(raw))

    out = entry(tok, float(logp[tok]))
    if top_n > 0:
        vals, ids = torch.topk(logp, top_n)
        out.top = [entry(int(i), float(v)) for v, i in zip(vals.tolist(), ids.tolist())]
    return out


@dataclass
class Feed:
    """What a driver does next for a sequence: drop ``drop`` tokens from the tail of its cached
    tokens, then run ``token`` at the next position and hand the logits to :meth:`SequenceRun.step`."""

    token: int
    drop: int = 0


class SequenceRun:
    """Sampling, stop rules, banned phrases and streamed text of one sequence; fills ``choice``."""

    def __init__(self, lm: LoadedModel, prompt: Sequence[int], params: GenerationParams,
                 generator: torch.Generator | None = None) -> None:
        params.sampling.validate()
        self.lm, self.prompt, self.params = lm, list(prompt), params
        self.max_new, self.sampling = params.max_new, params.sampling
        self.choice = Choice(prompt_tokens=len(self.prompt), logprobs=[] if params.logprobs is not None else None,
                             prompt_logprobs=[] if params.prompt_logprobs else None)
        self.stops = StopMatcher(params.stop)
        self.bans = PhraseBans(params.banned_phrases)
        self.stop_set = set(lm.tokenizer.stop_ids if params.stop_ids is None else params.stop_ids)
        self.gen = generator if generator is not None else make_generator(params.sampling.seed)
        self.batchable = batchable(params.sampling)
        self.device_gen: torch.Generator | None = None  # the batch sampler's, where the logits are not on the CPU
        self.state = SamplerState()
        self.history = list(self.prompt)
        self.decoder = self._decoder()
        self.offsets: list[int] = []  # text length after each generated token
        self.position_bans: dict[int, set[int]] = {}
        for t in range(params.min_tokens if self.max_new < 0 else min(params.min_tokens, self.max_new)):
            self.position_bans[t] = set(lm.tokenizer.stop_ids) | self.stop_set
        self.backtracks = 0
        self.text, self.emitted = "", 0
        self.hit_stop_string: str | None = None
        self.first_logits: torch.Tensor | None = None
        self.fed = 0  # generated tokens whose KV entries the driver holds
        self.done = False
        self.started = 0.0
        self.grammar = params.constraint() if params.constraint is not None else None

    def _decoder(self) -> StreamDecoder:
        return StreamDecoder(self.lm.tokenizer, skip_special=self.params.skip_special, shown=self.params.shown_ids)

    # --- the prompt ------------------------------------------------------------------------------
    def prompt_logits(self, logits: torch.Tensor, start: int) -> None:
        """Record the log-probabilities of prompt tokens ``start+1 ..`` from the logits [T, V] of
        prompt positions ``start ..`` (OpenAI's echo with logprobs)."""
        res = self.choice
        self._first_prompt_entry()
        logp = torch.log_softmax(logits.float(), dim=-1)
        for j in range(logits.shape[0]):
            if start + j + 1 < len(self.prompt):
                res.prompt_logprobs.append(token_logprob(self.lm, logp[j], self.prompt[start + j + 1],  # type: ignore[union-attr]
                                                         self.params.logprobs or 0))

    def _first_prompt_entry(self) -> None:
        """The first prompt token's entry (no log-probability: nothing precedes it)."""
        entries = self.choice.prompt_logprobs
        if entries is None:
            entries = self.choice.prompt_logprobs = []
        if not entries:
            first = self.lm.tokenizer.token_bytes(self.prompt[0])
            entries.append(TokenLogprob(self.prompt[0], first.decode("utf-8", errors="replace"),
                                                         None, list(first)))

    def end_prompt(self, prefill_seconds: float, prompt_logprobs: bool = False) -> Feed | None:
        """The prompt is in the cache except its last token: that one is fed as the first decode
        step (so a repeated request computes it with the same kernel and batch shape). None when
        nothing is to be generated. ``prompt_logprobs``: the prompt's entries were asked for (a
        one-token prompt has only its first, which no chunk wrote)."""
        res = self.choice
        if prompt_logprobs:
            self._first_prompt_entry()
        if res.prompt_logprobs:
            offset, dec = 0, self._decoder()
            for entry in res.prompt_logprobs:
                entry.text_offset = offset
                offset += len(dec.feed(entry.token_id))
        res.prefill_seconds = prefill_seconds
        self.started = time.perf_counter()
        if self.max_new <= 0:
            self.finish()
            return None
        return Feed(self.prompt[-1])

    # --- decode ----------------------------------------------------------------------------------
    def batch_row(self, device: torch.device) -> Row | None:
        """This step's row for the batch sampler (:mod:`..sampling.batched`), or None when the host
        chain samples it (settings it does not take, a grammar, a token banned at this position)."""
        if not self.batchable or self.grammar is not None or len(self.choice.token_ids) in self.position_bans:
            return None
        if device.type == "cpu":
            return Row(self.sampling, self.history, self.gen)
        if self.device_gen is None:  # seeded from the run's own generator: a seed still fixes the text
            self.device_gen = make_generator(int(torch.randint(2**62, (1,), generator=self.gen)), device)
        return Row(self.sampling, self.history, self.device_gen)

    def step(self, logits: torch.Tensor, chosen: int | None = None) -> tuple[str, Feed | None]:
        """Sample after the last fed token (``chosen``: the batch sampler already did, from the row
        :meth:`batch_row` gave); returns the text now safe to show and the next feed (None: the
        sequence is finished, and the text includes its end)."""
        res = self.choice
        if self.first_logits is None:  # a copy: the row may be a view of a buffer the next step reuses (graphs)
            self.first_logits = logits.clone()
        while True:
            step = len(res.token_ids)
            step_logits = logits
            if step in self.position_bans:
                step_logits = logits.clone()
                step_logits[list(self.position_bans[step])] = float("-inf")
            if self.grammar is not None:  # only what keeps the output in the grammar
                step_logits = self.grammar.mask(step_logits)
            if chosen is not None:
                tok, chosen = chosen, None  # a resample after a banned phrase runs on the host
            else:
                tok = sample(step_logits, self.sampling, self.history, self.gen, self.state)
            if tok in self.stop_set:
                res.stop_kind, res.stop_string = "eos", self.lm.tokenizer.id_to_token(tok)
                return self.finish(), None
            if self.grammar is not None:
                self.grammar.accept(tok)
            if res.logprobs is not None:
                entry = token_logprob(self.lm, torch.log_softmax(logits.float(), dim=-1), tok, self.params.logprobs or 0)
                entry.text_offset = len(self.text)
                res.logprobs.append(entry)
            res.token_ids.append(tok)
            self.history.append(tok)
            self.text += self.decoder.feed(tok)
            self.offsets.append(len(self.text))
            if self.bans and self.backtracks < MAX_BACKTRACKS:
                at = self.bans.find(self.text, self.offsets[-2] if len(self.offsets) > 1 else 0)
                if at is not None:  # undo from the token where the phrase starts, ban it there, resample
                    t = next(i for i, end in enumerate(self.offsets) if end > at)
                    self.position_bans.setdefault(t, set()).add(res.token_ids[t])
                    self.backtracks += 1
                    if self.grammar is not None:
                        self.grammar.rollback(len(res.token_ids) - t)
                    del res.token_ids[t:], self.offsets[t:], self.history[len(self.prompt) + t :]
                    if res.logprobs is not None:
                        del res.logprobs[t:]
                    self.decoder = self._decoder()
                    self.text = "".join(self.decoder.feed(i) for i in res.token_ids)
                    if t == 0:
                        logits = self.first_logits
                        continue
                    return "", self._feed(res.token_ids[t - 1], t - 1)
            hit = self.stops.find(self.text, self.emitted)
            if hit is not None:
                self.text = self.text[: hit[0] + (len(hit[1]) if self.params.include_stop else 0)]
                res.stop_kind, res.stop_string = "stop_string", hit[1]
                self.hit_stop_string = hit[1]
                return self.finish(), None
            piece = ""
            text = self.text
            safe = min(self.stops.safe_length(text), len(text) - self.bans.hold(text) if self.bans else len(text))
            if self.bans and safe < len(text):  # hold back whole tokens, so a rollback never retracts text
                safe = max([0] + [end for end in self.offsets if end <= safe])
            if safe > self.emitted:
                piece = text[self.emitted : safe]
                self.emitted = safe
            if len(res.token_ids) >= self.max_new:
                return piece + self.finish(), None
            if self.grammar is not None and self.grammar.finished:  # complete: only the end could follow
                res.stop_kind = "eos"
                return piece + self.finish(), None
            return piece, self._feed(tok, len(res.token_ids) - 1)

    def _feed(self, token: int, keep: int) -> Feed:
        """Feed ``token`` after keeping ``keep`` generated tokens in the cache."""
        drop, self.fed = self.fed - keep, keep + 1
        return Feed(token, drop)

    def finish(self, reason: str | None = None) -> str:
        """End the sequence (``reason`` "abort" or "length" when it ends from outside); returns
        the text not yet shown."""
        if self.done:
            return ""
        res = self.choice
        self.done = True
        if reason is not None:
            res.stop_kind = reason
        if self.hit_stop_string is None:
            self.text += self.decoder.flush()
        piece = self.text[self.emitted :]
        self.emitted = len(self.text)
        res.text = self.text
        res.decode_seconds = time.perf_counter() - self.started if self.started else 0.0
        return piece
