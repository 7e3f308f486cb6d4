"""Generation for one sequence: prefill the prompt (in chunks, reusing a cached prefix), then
one-token decode steps.

Streaming yields text pieces that never split a UTF-8 character and never show a stop
string or a banned phrase (text that might begin one is held back until it is clear). A banned
phrase that appears anyway is undone by backtracking: the tokens from the one where it started
are dropped, that token is banned at that position, and sampling resumes there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from .loader import LoadedModel
from .request import TokenLogprob
from .sampling import SamplerState, SamplingParams, make_generator, sample
from .tokenizer import StreamDecoder

PREFILL_CHUNK = 256  # prompt tokens per forward pass (abort is checked between chunks)
MAX_BACKTRACKS = 256  # banned-phrase rollbacks per generation before phrases are ignored


@dataclass
class GenerationResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "stop" (EOS/EOT or stop string) | "length" | "abort"
    stop_reason: str | None = None  # the stop string or token text that ended it
    stop_kind: str = "length"  # "eos" | "stop_string" | "length" | "abort"
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV entries were reused
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token in token_ids (when asked)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # one per prompt token (when asked)
    kv_tokens: list[int] = field(default_factory=list)  # tokens whose KV entries now sit at positions 0..n-1

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def decode_tokens_per_second(self) -> float:
        steps = max(0, len(self.token_ids) - 1)  # the first token comes from the prefill
        return steps / self.decode_seconds if self.decode_seconds > 0 else 0.0


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


def _token_logprob(lm: LoadedModel, logp: torch.Tensor, tok: int, top_n: int) -> TokenLogprob:
    tokenizer = lm.tokenizer

    def entry(i: int, value: float | None) -> TokenLogprob:
        raw = tokenizer.token_bytes(i)
        return TokenLogprob(i, raw.decode("utf-8", errors="replace"), value, list(raw))

    out = entry(tok, float(logp[tok]))
    if top_n > 0:
        vals, ids = torch.topk(logp, top_n)
        out.top = [entry(int(i), float(v)) for v, i in zip(vals.tolist(), ids.tolist())]
    return out


def generate_stream(
    lm: LoadedModel,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    params: SamplingParams,
    stop: Sequence[str] = (),
    stop_ids: Sequence[int] | None = None,
    should_abort: Callable[[], bool] | None = None,
    result: GenerationResult | None = None,
    *,
    generator: torch.Generator | None = None,
    banned_phrases: Sequence[str] = (),
    logprobs: int | None = None,
    prompt_logprobs: bool = False,
    include_stop: bool = False,
    skip_special: bool = True,
    kv_prefix: Sequence[int] | None = None,
) -> Iterator[str]:
    """Yield text pieces as they are generated; fill ``result`` (if given) as it goes.

    ``generator`` overrides the one made from ``params.seed``. ``banned_phrases`` are undone by
    backtracking (case-insensitive). ``logprobs=N`` records each token's log-probability (under
    the raw model distribution) with N alternatives; ``prompt_logprobs`` does the same for the
    prompt. ``include_stop`` keeps a matched stop string in the text. ``kv_prefix`` names the
    tokens whose KV entries the cache already holds (from the last call, ``result.kv_tokens``):
    the common prefix with the prompt is not computed again.
    """
    res = result if result is not None else GenerationResult()
    prompt = list(prompt_ids)
    if not prompt:
        raise ValueError("the prompt is empty (no tokens)")
    if len(prompt) >= lm.context:
        raise ValueError(f"the prompt has {len(prompt)} tokens; the context holds {lm.context}")
    params.validate()
    max_new = max(0, min(max_new_tokens, lm.context - len(prompt)))
    stops = StopMatcher(stop)
    bans = PhraseBans(banned_phrases)
    stop_set = set(lm.tokenizer.stop_ids if stop_ids is None else stop_ids)
    gen = generator if generator is not None else make_generator(params.seed)
    state = SamplerState()
    model, device = lm.model, lm.device
    res.prompt_tokens = len(prompt)
    history = list(prompt)

    def forward(ids: Sequence[int], start: int, last_only: bool) -> torch.Tensor:
        tokens = torch.tensor([list(ids)], dtype=torch.long, device=device)
        pos = torch.arange(start, start + len(ids), device=device)
        res.kv_tokens = res.kv_tokens[:start]  # what a failed pass may have overwritten is no longer valid
        out = model(tokens, pos, kv_len=start + len(ids), last_only=last_only)[0]
        res.kv_tokens = res.kv_tokens + list(ids)
        return out

    # --- prefill: reuse the cached prefix, compute the rest in chunks ---
    t0 = time.perf_counter()
    reuse = 0 if prompt_logprobs or kv_prefix is None else min(common_prefix(kv_prefix, prompt), len(prompt) - 1)
    res.kv_tokens, res.cached_tokens = prompt[:reuse], reuse
    chunk = 64 if prompt_logprobs else PREFILL_CHUNK
    if prompt_logprobs:
        first = lm.tokenizer.token_bytes(prompt[0])
        res.prompt_logprobs = [TokenLogprob(prompt[0], first.decode("utf-8", errors="replace"), None, list(first))]
    logits = torch.empty(0)
    end = len(prompt) if max_new > 0 or prompt_logprobs else reuse  # nothing to generate: nothing to compute
    # The last prompt token runs on its own, as a decode step does: a repeated request, which
    # reuses every cached token but that one, then computes its logits with the same kernel
    # and batch shape, so the same seed gives the same text on the packed fast path too.
    bounds = [(start, min(start + chunk, end)) for start in range(reuse, end, chunk)]
    if not prompt_logprobs and bounds and bounds[-1][1] - bounds[-1][0] > 1:
        last_start, last_end = bounds.pop()
        bounds += [(last_start, last_end - 1), (last_end - 1, last_end)]
    for start, stop in bounds:
        if should_abort is not None and should_abort():
            res.finish_reason = res.stop_kind = "abort"
            res.prefill_seconds = time.perf_counter() - t0
            return
        ids = prompt[start:stop]
        out = forward(ids, start, last_only=not prompt_logprobs)
        if prompt_logprobs:
            logp = torch.log_softmax(out.float(), dim=-1)
            for j in range(len(ids)):
                if start + j + 1 < len(prompt):
                    res.prompt_logprobs.append(_token_logprob(lm, logp[j], prompt[start + j + 1], logprobs or 0))
        logits = out[-1]
    prefill_logits = logits
    if prompt_logprobs:  # each prompt token's offset in the prompt's text
        offset, dec = 0, StreamDecoder(lm.tokenizer, skip_special=skip_special)
        for entry in res.prompt_logprobs:
            entry.text_offset = offset
            offset += len(dec.feed(entry.token_id))
    res.prefill_seconds = time.perf_counter() - t0

    # --- decode ---
    t1 = time.perf_counter()
    decoder = StreamDecoder(lm.tokenizer, skip_special=skip_special)
    offsets: list[int] = []  # text length after each generated token
    position_bans: dict[int, set[int]] = {}
    backtracks = 0
    text, emitted = "", 0
    hit_stop_string: str | None = None
    while len(res.token_ids) < max_new:
        if should_abort is not None and should_abort():
            res.finish_reason = res.stop_kind = "abort"
            break
        step = len(res.token_ids)
        step_logits = logits
        if step in position_bans:
            step_logits = logits.clone()
            step_logits[list(position_bans[step])] = float("-inf")
        tok = sample(step_logits, params, history, gen, state)
        if tok in stop_set:
            res.finish_reason, res.stop_kind, res.stop_reason = "stop", "eos", lm.tokenizer.id_to_token(tok)
            break
        if logprobs is not None:
            entry = _token_logprob(lm, torch.log_softmax(logits.float(), dim=-1), tok, logprobs)
            entry.text_offset = len(text)
            res.logprobs.append(entry)
        res.token_ids.append(tok)
        history.append(tok)
        text += decoder.feed(tok)
        offsets.append(len(text))
        if bans and backtracks < MAX_BACKTRACKS:
            at = bans.find(text, offsets[-2] if len(offsets) > 1 else 0)
            if at is not None:  # undo from the token where the phrase starts, ban it there, resample
                t = next(i for i, end in enumerate(offsets) if end > at)
                position_bans.setdefault(t, set()).add(res.token_ids[t])
                backtracks += 1
                del res.token_ids[t:], offsets[t:], history[len(prompt) + t :]
                del res.logprobs[t:]
                decoder = StreamDecoder(lm.tokenizer, skip_special=skip_special)
                text = "".join(decoder.feed(i) for i in res.token_ids)
                if t == 0:
                    logits = prefill_logits
                    res.kv_tokens = res.kv_tokens[: len(prompt)]
                else:
                    logits = forward([res.token_ids[t - 1]], len(prompt) + t - 1, True)[-1]
                continue
        hit = stops.find(text, emitted)
        if hit is not None:
            text = text[: hit[0] + (len(hit[1]) if include_stop else 0)]
            res.finish_reason, res.stop_kind, res.stop_reason = "stop", "stop_string", hit[1]
            hit_stop_string = hit[1]
            break
        safe = min(stops.safe_length(text), len(text) - bans.hold(text) if bans else len(text))
        if bans and safe < len(text):  # hold back whole tokens, so a rollback never retracts text
            safe = max([0] + [end for end in offsets if end <= safe])
        if safe > emitted:
            yield text[emitted:safe]
            emitted = safe
        if len(res.token_ids) < max_new:
            logits = forward([tok], len(prompt) + len(res.token_ids) - 1, True)[-1]
    if res.finish_reason == "length":
        res.stop_kind = "length"
    if hit_stop_string is None:
        text += decoder.flush()
    if len(text) > emitted:
        yield text[emitted:]
    res.text = text
    res.decode_seconds = time.perf_counter() - t1


def generate(
    lm: LoadedModel,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    params: SamplingParams,
    stop: Sequence[str] = (),
    **kwargs,
) -> GenerationResult:
    res = GenerationResult()
    for _ in generate_stream(lm, prompt_ids, max_new_tokens, params, stop, result=res, **kwargs):
        pass
    return res
