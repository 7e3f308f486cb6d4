"""The engine on a tiny random-weight model: queueing, abort/check by genkey, prefix reuse,
prompt fitting and clamping, stop strings, banned phrases, logprobs, n > 1 (no HTTP)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import pytest

from nkat_runtime.errors import ContextLengthError, InvalidRequestError, ServerBusyError
from nkat_runtime.loader import load_model
from nkat_runtime.request import GenerationRequest
from nkat_runtime.sampling.params import SamplingParams
from nkat_runtime.serve.engine import Engine
from nkat_runtime.serve.prepare import Preparer

GREEDY = SamplingParams.greedy()


@pytest.fixture(scope="module")
def engine(tiny_model):
    lm = load_model(tiny_model("llama"), context=2048, progress=False)
    eng = Engine(lm, max_queue=1, default_max_tokens=16)
    yield eng
    eng.close()


def req(prompt="the and of", **kw) -> GenerationRequest:
    kw.setdefault("sampling", GREEDY)
    kw.setdefault("ban_eos", True)  # random weights: never stop early by chance
    return GenerationRequest(prompts=[prompt], **kw)


def run(engine: Engine, request: GenerationRequest):
    """(outcome, the streamed text pieces per choice index)."""

    async def go():
        handle = engine.submit(engine.prepare(request))
        pieces: dict[int, list[str]] = {}
        async for ev in handle.events():
            if ev.kind == "text":
                pieces.setdefault(ev.index, []).append(ev.text)
            if ev.kind == "error":
                raise ev.error
            if ev.kind == "done":
                return ev.outcome, pieces

    return asyncio.run(go())


def test_generates_streams_and_reuses_the_prefix(engine):
    out1, pieces = run(engine, req(max_tokens=6))
    c = out1.choices[0]
    assert c.completion_tokens == 6 and c.finish_reason == "length" and c.stop_kind == "length"
    assert "".join(pieces[0]) == c.text
    out2, _ = run(engine, req(max_tokens=6))
    assert out2.choices[0].text == c.text  # greedy: the same text
    assert out2.choices[0].cached_tokens == c.prompt_tokens - 1  # only the last prompt token recomputed
    longer, _ = run(engine, req("the and of the", max_tokens=6))
    assert longer.choices[0].cached_tokens >= c.prompt_tokens - 1


def test_same_seed_same_text_and_n_choices(engine):
    sampled = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    a, _ = run(engine, req(max_tokens=8, sampling=sampled, seed=42, n=2))
    b, _ = run(engine, req(max_tokens=8, sampling=sampled, seed=42, n=2))
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.seed == 42 and a.completion_tokens == 16
    two, pieces = run(engine, GenerationRequest(prompts=["the", "and of"], sampling=GREEDY, max_tokens=3, ban_eos=True))
    assert [c.index for c in two.choices] == [0, 1] and set(pieces) <= {0, 1}
    assert two.prompt_tokens == sum(c.prompt_tokens for c in two.choices)


def test_stop_string_trim_and_keep(engine):
    base, _ = run(engine, req(max_tokens=12))
    text = base.choices[0].text
    stop = text[4:6]
    assert len(stop) == 2
    at = text.find(stop)
    out, _ = run(engine, req(max_tokens=12, stop=[stop]))
    assert out.choices[0].text == text[:at] and out.choices[0].stop_kind == "stop_string"
    assert out.choices[0].finish_reason == "stop" and out.choices[0].stop_string == stop
    kept, _ = run(engine, req(max_tokens=12, stop=[stop], trim_stop=False))
    assert kept.choices[0].text == text[: at + 2]


def test_banned_phrase_is_backtracked(engine):
    base, _ = run(engine, req(max_tokens=12))
    text = base.choices[0].text
    phrase = text[3:6]
    out, pieces = run(engine, req(max_tokens=12, banned_strings=[phrase.upper() if phrase.isascii() else phrase]))
    got = out.choices[0].text
    assert phrase.lower() not in got.lower()
    assert "".join(pieces.get(0, [])) == got  # nothing streamed was ever taken back
    assert out.choices[0].completion_tokens == 12


def test_logprobs_and_echo(engine):
    out, _ = run(engine, req(max_tokens=4, logprobs=2, echo=True))
    c = out.choices[0]
    assert len(c.logprobs) == 4 and all(len(e.top) == 2 and e.logprob <= 0 for e in c.logprobs)
    assert all(e.top[0].logprob >= e.top[1].logprob for e in c.logprobs)
    assert c.prompt_logprobs[0].logprob is None and len(c.prompt_logprobs) == c.prompt_tokens
    # greedy: the chosen token is the most likely one
    assert all(e.token_id == e.top[0].token_id for e in c.logprobs)


def test_fitting_keeps_memory_and_cuts_the_prompt_head(engine):
    tok = engine.lm.tokenizer
    memory = "memory: of the and "
    prompt = "the and of " * 600
    r = req(prompt, memory=memory, max_tokens=4, max_context_length=256)
    prepared = engine.prepare(r)
    ids = prepared.prompts[0].ids
    mem_ids = tok.encode(memory, add_special=False)
    assert ids[0] == tok.bos_id and ids[1 : 1 + len(mem_ids)] == mem_ids
    assert len(ids) + 4 <= 256 and prepared.truncated_tokens > 0
    assert ids[-5:] == tok.encode(prompt, add_special=False)[-5:]  # the tail survives
    assert any("truncated" in w for w in prepared.warnings)
    clamped = engine.prepare(req(max_tokens=10_000, max_context_length=256))
    assert clamped.prompts[0].max_new == 256 - max(16, 256 // 5)
    assert any("clamped" in w for w in clamped.warnings)


def test_openai_style_overflow_is_an_error_and_length_is_clamped(engine):
    with pytest.raises(ContextLengthError):
        engine.prepare(req("the and of " * 2000, overflow="error"))
    p = engine.prepare(req("the", overflow="error", max_tokens=5000))  # context shift on: allowed past the end
    assert p.prompts[0].max_new == 5000 and not p.warnings
    no_shift = Preparer(engine.lm, 16, context_shift=False)
    p = no_shift.prepare(req("the", overflow="error", max_tokens=5000))
    assert p.prompts[0].max_new == engine.context - len(p.prompts[0].ids) and p.warnings
    with pytest.raises(InvalidRequestError):
        engine.prepare(req(""))
    with pytest.raises(InvalidRequestError):
        engine.prepare(GenerationRequest(prompts=[[10**9]]))


def test_queue_limit_and_cancelling_a_queued_job(engine):
    async def go():
        with engine._cond:  # hold the worker back: the jobs stay queued
            # one slot is free and --max-queue is 1: two jobs are taken, the third is turned away
            first = engine.submit(engine.prepare(req(max_tokens=2)))
            second = engine.submit(engine.prepare(req(max_tokens=2)))
            with pytest.raises(ServerBusyError):
                engine.submit(engine.prepare(req(max_tokens=2)))
            first.cancel()
            second.cancel()
        for handle in (first, second):
            outcome = await handle.result()
            assert outcome.choices[0].finish_reason == "abort" and outcome.choices[0].text == ""

    asyncio.run(go())


def test_abort_by_genkey_and_check(engine):
    long = dataclasses.replace(req(max_tokens=1900, genkey="KCPP0001"))
    result: dict = {}

    def background():
        result["out"], _ = run(engine, long)

    t = threading.Thread(target=background)
    t.start()
    deadline = time.time() + 60
    while not engine.check("KCPP0001") and time.time() < deadline:
        time.sleep(0.005)
    assert engine.check("KCPP0001")
    assert engine.check("") == ""  # the running job has a key: no peeking without it
    assert engine.abort("KCPP9999") == (False, False)
    assert engine.abort("KCPP0001") == (True, True)
    t.join(60)
    c = result["out"].choices[0]
    assert c.finish_reason == "abort" and c.completion_tokens < 1900
    assert engine.stats.last_stop_kind == "abort" and engine.stats.stop_reason_code == -1


def test_keyless_abort_stops_the_running_job(engine):
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(out=run(engine, req(max_tokens=1900))[0]))
    t.start()
    deadline = time.time() + 60
    while not engine.check("") and time.time() < deadline:
        time.sleep(0.005)
    assert engine.abort("") == (True, True)
    t.join(60)
    assert result["out"].choices[0].completion_tokens < 1900


def test_stream_never_splits_a_utf8_character(engine, monkeypatch):
    import nkat_runtime.serve.scheduler as scheduler
    import nkat_runtime.serve.sequence as generation

    raw = "😀é".encode()  # 4 + 2 bytes, one byte-fallback token each (ids 3 + byte in the tiny vocab)
    script = iter([3 + b for b in raw])
    monkeypatch.setattr(generation, "sample", lambda *a, **k: next(script))  # the host chain's rows
    monkeypatch.setattr(scheduler, "sample_batch", lambda logits, rows: [next(script) for _ in rows])  # the batch's
    out, pieces = run(engine, req(max_tokens=len(raw)))
    assert pieces[0] == ["😀", "é"] and out.choices[0].text == "😀é"


def test_min_tokens_holds_off_the_end(engine):
    """SillyTavern's / vLLM's min_tokens: end-of-generation tokens are banned for that many tokens,
    then allowed again (a +100 bias makes EOS the greedy choice at every step)."""
    eos = engine.lm.tokenizer.eos_id
    eager = req(max_tokens=12, ban_eos=False, logit_bias={eos: 100.0})
    out, _ = run(engine, eager)
    assert out.choices[0].completion_tokens == 0 and out.choices[0].finish_reason == "stop"
    held, _ = run(engine, dataclasses.replace(eager, min_tokens=5))
    c = held.choices[0]
    assert c.completion_tokens == 5 and c.finish_reason == "stop" and eos not in c.token_ids
