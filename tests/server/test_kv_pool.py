"""The KV block pool under the engine: shared prompt prefixes, copy-on-write, blocks given back
on finish and abort, and preemption when the pool runs out (tiny random model, float32 math)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from enginecalls import forget, ids, req, result, run
from nkat_runtime.loader import load_model
from nkat_runtime.serve.engine import Engine
from nkat_runtime.serve.scheduler import SchedulerConfig

BS = 8


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return load_model(tiny_model("llama"), context=128, progress=False, reference=True)


def engine_for(tiny, **kw) -> Engine:
    kw.setdefault("block_size", BS)
    return Engine(tiny, max_queue=16, config=SchedulerConfig(**kw))


def consistent(engine: Engine) -> None:
    """Every block's count is the slots' holdings; nothing is held by a sequence that ended."""
    sched = engine.sched
    sched.pool.check([s.table for s in sched.slots])
    assert engine.cache_stats()["blocks_running"] == 0


def together(engine: Engine, requests) -> list:
    async def go():
        return await asyncio.gather(*(result(engine, r) for r in requests))

    return [o.choices[0] for o in asyncio.run(go())]


def test_a_shared_prefix_is_held_once_and_gives_a_full_prefills_logits(tiny):
    card = ids(41, 20)  # a "character card": 5 full blocks of 8, and one token more
    turns = [ids(6, 100 + 10 * i) for i in range(3)]
    engine = engine_for(tiny, slots=4, cache_ram_bytes=0)
    try:
        fresh = [run(engine, req(card + t, max_tokens=4, logprobs=3, cache_prompt=False)).choices[0] for t in turns]
        forget(engine)
        first = run(engine, req(card + turns[0], max_tokens=4, logprobs=3)).choices[0]

        async def go():  # the first one's slot is busy in a long run while the others come: they
            # cannot reuse its slot, only its registered blocks
            long = engine.submit(engine.prepare(req(card + turns[0], max_tokens=40, ban_eos=True)))
            outs = await asyncio.gather(*(result(engine, req(card + t, max_tokens=4, logprobs=3)) for t in turns[1:]))
            stats = engine.cache_stats()
            await long.result()
            return [o.choices[0] for o in outs], stats

        shared, st = asyncio.run(go())
        consistent(engine)
    finally:
        engine.close()
    assert first.cached_tokens == 0
    # 5 blocks each from the first's table (or, for one of them, the first's idle slot: 41 tokens)
    assert all(c.cached_tokens >= 40 for c in shared)
    assert st["blocks_shared"] >= 5
    for a, b in zip(fresh[1:], shared):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs):  # float32 sums in other chunk shapes: ulp-sized gaps
            assert max(abs(p.logprob - q.logprob) for p, q in zip(x.top, y.top)) < 1e-4


def test_prompts_arriving_together_compute_their_common_prefix_once(tiny):
    card = ids(49, 30)
    engine = engine_for(tiny, slots=4, cache_ram_bytes=0)
    try:
        outs = together(engine, [req(card + ids(5, 120 + 9 * i), max_tokens=2) for i in range(4)])
        consistent(engine)
        held = engine.cache_stats()["blocks_held"]
    finally:
        engine.close()
    # one of them computed the card's 6 full blocks; the others waited for them and shared them
    assert sorted(c.cached_tokens for c in outs) == [0, 48, 48, 48]
    # 6 shared blocks + each one's own tail block(s), not 4 copies of the card
    assert held <= 6 + 4 * 2


def test_a_sequence_that_diverges_inside_a_shared_block_writes_a_copy(tiny):
    card = ids(40, 40)
    engine = engine_for(tiny, slots=2, cache_ram_bytes=0, cache_reuse=0)
    try:
        async def go():
            long = engine.submit(engine.prepare(req(card + ids(3, 200), max_tokens=30, ban_eos=True)))
            await result(engine, req(card + ids(3, 150), max_tokens=2))  # shares 5 blocks with the long one
            await long.result()

        asyncio.run(go())
        sched = engine.sched
        a, b = sched.slots
        shared = [blk for blk in a.table if blk in b.table]
        assert len(shared) == 5
        model = tiny.model
        before = [model.read_kv(s.table, len(s.tokens)) for s in (a, b)]
        # diverges at position 20 (inside the third shared block) in whichever slot it takes
        out = run(engine, req(card[:20] + ids(10, 205), max_tokens=3)).choices[0]
        consistent(engine)
        taken, other = (a, b) if a.tokens[20:30] == ids(10, 205) else (b, a)
        kept = model.read_kv(other.table, len(other.tokens))
        old = before[0] if other is a else before[1]
        assert all(torch.equal(x, y) for lx, ly in zip(kept, old) for x, y in zip(lx, ly))  # never written
        assert taken.table[2] != other.table[2] and taken.table[:2] == other.table[:2]
    finally:
        engine.close()
    assert out.cached_tokens == 20


def test_blocks_go_back_on_finish_and_abort_under_load(tiny):
    engine = engine_for(tiny, slots=3, cache_ram_bytes=0)

    async def one(i: int):
        handle = engine.submit(engine.prepare(req(ids(10 + 3 * i, 11 * i), max_tokens=20, ban_eos=True)))
        async for ev in handle.events():
            if ev.kind == "text" and i % 3 == 0:
                handle.cancel()
            if ev.kind == "done":
                return ev.outcome

    async def load():
        return await asyncio.gather(*(one(i) for i in range(10)))

    try:
        outs = asyncio.run(load())
        for _ in range(100):
            if engine.idle():
                break
            asyncio.run(asyncio.sleep(0.02))
        reasons = [o.choices[0].finish_reason for o in outs]
        consistent(engine)
        engine.sched.cache.clear()
        st = engine.cache_stats()
    finally:
        engine.close()
    assert "abort" in reasons and "length" in reasons
    assert st["blocks_free"] == st["blocks_total"] and st["blocks_held"] == 0


def test_a_full_pool_preempts_and_recomputes_with_the_same_text(tiny):
    prompts = [ids(12, 10 + 40 * i) for i in range(3)]
    big = engine_for(tiny, slots=3, cache_ram_bytes=0)
    try:
        alone = [run(big, req(p, max_tokens=40, ban_eos=True, cache_prompt=False)).choices[0] for p in prompts]
    finally:
        big.close()
    small = engine_for(tiny, slots=3, cache_ram_bytes=0, pool_tokens=80)  # at least one context and a block: 17 blocks
    try:
        outs = together(small, [req(p, max_tokens=40, ban_eos=True, cache_prompt=False) for p in prompts])
        consistent(small)
        preempted = small.sched.preemptions
    finally:
        small.close()
    assert preempted > 0
    for a, b in zip(alone, outs):
        assert b.finish_reason == "length" and b.token_ids == a.token_ids and b.text == a.text
