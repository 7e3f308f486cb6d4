"""Serving at scale: continuous batching, prompt-cache reuse (prefix, moved chunks, RAM cache),
context shift and slot release, on the engine (no HTTP; the server tests cover the routes)."""

from __future__ import annotations

import asyncio
import os

import pytest
import torch

from enginecalls import forget, ids, req, result, run
from nkat_runtime.loader import load_model
from nkat_runtime.serve.engine import Engine
from nkat_runtime.serve.kv_slots import PromptCache, plan_reuse
from nkat_runtime.serve.scheduler import SchedulerConfig


# --- planning ------------------------------------------------------------------------------------
def test_plan_reuse_prefix_and_moved_chunks():
    sys_, a, b, c = [1, 2, 3], list(range(10, 50)), list(range(50, 90)), list(range(90, 95))
    cached = sys_ + a + b
    prompt = sys_ + b + c  # the oldest exchange (a) dropped, a new one (c) added
    plan = plan_reuse(cached, prompt, 16, len(prompt) - 1)
    assert plan.prefix == 3 and plan.moves == [(3 + len(a), 3, len(b))] and plan.reused == 3 + len(b)
    assert plan_reuse(cached, prompt, 0, len(prompt) - 1).reused == 3  # prefix only
    assert plan_reuse(cached, prompt, 41, len(prompt) - 1).reused == 3  # chunk too short to move
    assert plan_reuse(cached, cached, 16, len(cached) - 1).reused == len(cached) - 1  # the last token is run


def test_prompt_cache_is_lru_within_its_budget_and_superseded_prefixes_go():
    kv = lambda n: [(torch.zeros(1, n, 4), torch.zeros(1, n, 4))]  # noqa: E731  (32 bytes per token)
    cache = PromptCache(limit_bytes=32 * 100)
    assert cache.save([1] * 40, kv(40)) and cache.save([2] * 40, kv(40))
    assert cache.save([2] * 40 + [3] * 10, kv(50))  # supersedes [2]*40; [1]*40 stays (90 tokens fit)
    assert sorted(len(e.tokens) for e in cache.entries.values()) == [40, 50]
    assert cache.save([4] * 60, kv(60))  # over budget: the least recently saved entry leaves
    assert sorted(len(e.tokens) for e in cache.entries.values()) == [60] and cache.nbytes == 32 * 60
    assert not cache.save([5] * 101, kv(101))  # larger than the whole budget
    key, plan = cache.best([4] * 60 + [9], 16, 60)
    assert plan.reused == 60 and len(cache.take(key).tokens) == 60 and len(cache) == 0


# --- the real default model ----------------------------------------------------------------------
STREAMS = 8
TOKENS = int(os.environ.get("NKAT_INVARIANCE_TOKENS", "16"))  # the fast tier's budget; more by the variable
STORIES = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):",
           "The three primary colors are", "My favourite recipe for soup", "import numpy as np\n",
           "The history of the Roman Empire", "Dear Sir or Madam,"]


@pytest.fixture(scope="module")
def gemma(model_path):
    lm = load_model(model_path("gemma3-270m"), context=512, progress=False)
    engine = Engine(lm, config=SchedulerConfig(slots=STREAMS))
    yield engine
    engine.close()


def test_batched_greedy_equals_one_at_a_time(gemma):
    """8 streams decoded together give, token for token, what each gives alone (batch-invariant
    decode, the default). The guarantee is per cached prefix: a prompt that reuses cached tokens
    may differ in its last bits from one computed afresh (as in llama.cpp), so none is reused here. Run it under several instruction sets: ATEN_CPU_CAPABILITY=default|avx2|
    avx512, MKL_ENABLE_INSTRUCTIONS=AVX2|AVX512 (the slow tier does, at model level)."""
    # every stream runs all TOKENS steps (so all share every step), and no prompt reuses another's
    # cached tokens: reuse changes where prefill chunks start, and with them the prompt's bits
    ban = dict(ban_eos=True, cache_prompt=False)
    alone = [run(gemma, req(p, max_tokens=TOKENS, **ban)).choices[0] for p in STORIES]
    forget(gemma)
    sched = gemma.sched
    sched.peak_batch, steps_before = 0, sched.decode_steps

    async def together():
        return await asyncio.gather(*(result(gemma, req(p, max_tokens=TOKENS, **ban)) for p in STORIES))

    batched = [o.choices[0] for o in asyncio.run(together())]
    # they really decoded together: all 8 in one step, and about TOKENS steps in all (alone: 8 x TOKENS)
    assert sched.peak_batch == STREAMS and sched.decode_steps - steps_before <= TOKENS + STREAMS
    for a, b in zip(alone, batched):
        assert len(a.token_ids) == TOKENS and a.token_ids == b.token_ids and a.text == b.text
    assert len({a.text for a in alone}) == STREAMS  # different streams, no cross-talk


def test_aborted_request_frees_its_slot(gemma):
    async def go():
        handle = gemma.submit(gemma.prepare(req("Count from one to a thousand:", max_tokens=400, ban_eos=True)))
        async for ev in handle.events():
            if ev.kind == "text":
                handle.cancel()
            if ev.kind == "done":
                return ev.outcome

    out = asyncio.run(go())
    assert out.choices[0].finish_reason == "abort" and out.choices[0].completion_tokens < 400
    for _ in range(100):
        if gemma.idle():
            break
        asyncio.run(asyncio.sleep(0.05))
    assert gemma.idle() and not any(s["is_processing"] for s in gemma.slot_info())
    assert run(gemma, req("Hello", max_tokens=3)).choices[0].completion_tokens == 3  # still serving


# --- a tiny random model on float32 math (reference=True): exact comparisons are meaningful ---------
# (the fast path runs fewer than 256 rows through the int4 kernel with bf16 activations, more rows
# through float32: a prefix prefilled in other chunk shapes differs there by that kernel's error)
@pytest.fixture(scope="module")
def tiny(tiny_model):
    return load_model(tiny_model("llama"), context=64, progress=False, reference=True)


def test_reused_prefix_gives_the_logits_of_a_full_prefill(tiny):
    engine = Engine(tiny, config=SchedulerConfig(slots=1, cache_ram_bytes=0))
    try:
        head, tail = ids(30), ids(12, start=80)
        run(engine, req(head, max_tokens=1, logprobs=5))  # the slot now holds the head
        reused = run(engine, req(head + tail, max_tokens=6, logprobs=5)).choices[0]
        forget(engine)
        full = run(engine, req(head + tail, max_tokens=6, logprobs=5)).choices[0]
    finally:
        engine.close()
    assert reused.cached_tokens == len(head) and full.cached_tokens == 0
    assert reused.token_ids == full.token_ids
    for a, b in zip(reused.logprobs, full.logprobs):  # float32 sums in other chunk shapes: ulp-sized gaps
        assert [t.token_id for t in a.top] == [t.token_id for t in b.top]
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a.top, b.top)) < 1e-4


def test_moved_chunk_keys_are_re_rotated_to_their_new_positions(tiny):
    """Layer 0's keys depend on the token and its position only: a chunk moved down by the
    cache-reuse walk must hold exactly the keys a fresh prefill computes there."""
    engine = Engine(tiny, config=SchedulerConfig(slots=1, cache_reuse=8, cache_ram_bytes=0))
    sys_, old, kept, new = ids(4, 150), ids(10, 20), ids(20, 90), ids(6, 210)
    try:
        run(engine, req(sys_ + old + kept, max_tokens=1))
        out = run(engine, req(sys_ + kept + new, max_tokens=1)).choices[0]
        cache0, slot = tiny.model.layers[0].cache, engine.sched.slots[0]
        moved = cache0.positions(cache0.k, slot.table, len(sys_), len(sys_) + len(kept))[0]
        forget(engine)
        run(engine, req(sys_ + kept + new, max_tokens=1))
        fresh = cache0.positions(cache0.k, slot.table, len(sys_), len(sys_) + len(kept))[0]
    finally:
        engine.close()
    assert out.cached_tokens == len(sys_) + len(kept)
    torch.testing.assert_close(moved, fresh, rtol=1e-5, atol=1e-5)


def test_context_shift_generates_past_the_context(tiny):
    engine = Engine(tiny, config=SchedulerConfig(slots=1, n_keep=4))
    try:
        out = run(engine, req(ids(20), max_tokens=150, ban_eos=True, overflow="error")).choices[0]
        assert out.finish_reason == "length" and out.completion_tokens == 150 > tiny.context
        assert engine.sched.slots[0].tokens[:4] == ids(20)[:4]  # the kept head survived the shifts
    finally:
        engine.close()
    engine = Engine(tiny, config=SchedulerConfig(slots=1, context_shift=False))
    try:
        out = run(engine, req(ids(20), max_tokens=150, ban_eos=True, overflow="error"))
        assert out.choices[0].completion_tokens == tiny.context - 20 and out.warnings  # clamped, said so
    finally:
        engine.close()


def test_ram_cache_brings_back_a_conversation_that_lost_its_slot(tiny):
    engine = Engine(tiny, config=SchedulerConfig(slots=1, cache_reuse=0))
    chat_a, chat_b = ids(40, 10), ids(40, 100)
    try:
        run(engine, req(chat_a, max_tokens=2))
        run(engine, req(chat_b, max_tokens=2))  # takes the only slot: chat A goes to RAM
        assert len(engine.sched.ram) == 1
        back = run(engine, req(chat_a + ids(3, 210), max_tokens=2)).choices[0]
        held = [e.tokens[: len(chat_b)] for e in engine.sched.ram.entries.values()]
    finally:
        engine.close()
    assert back.cached_tokens == len(chat_a)
    assert held == [chat_b]  # chat B, displaced by A's return, waits in RAM in turn
