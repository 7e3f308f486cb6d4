"""The padded decode step that CUDA graphs capture (``nkat_runtime/model/graphs.py``), run eagerly on
the CPU: its logits equal the ordinary batched decode's (ragged lengths, scattered tables,
sliding windows, 16-bit and q8_0 caches), the padding rows write only into their own block,
and the engine generates the same text with it on. The capture itself needs a GPU
(``benchmarks/gpu_check.py`` runs it)."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
from test_paged_attention import BS, CTX, LENGTHS, prompts, scattered_tables

from enginecalls import req, result
from nkat_runtime.loader import load_model
from nkat_runtime.model.graphs import DecodeGraphs, bucket, width
from nkat_runtime.sampling.params import SamplingParams
from nkat_runtime.serve.engine import Engine
from nkat_runtime.serve.scheduler import SchedulerConfig

STEPS = 8


@pytest.fixture(scope="module", params=[("llama", "f32"), ("gemma3", "f32"), ("llama", "bf16"), ("qwen2", "q8_0")],
                ids=lambda p: "-".join(p))
def lm(request, tiny_model):
    arch, kind = request.param
    wide = dict(n_embd=256, n_head=4, n_head_kv=2, n_ff=256) if kind == "q8_0" else {}  # q8_0: heads of 64
    return load_model(tiny_model(arch, **wide), context=CTX, progress=False, reference=True, cache_types=(kind, kind))


def _prefill(model, toks, tables) -> None:
    for t, n, table in zip(toks, LENGTHS, tables):
        model(t[:, : n // 2 + 1], torch.arange(n // 2 + 1), tables=[table])
        model(t[:, n // 2 + 1 : n], torch.arange(n // 2 + 1, n), tables=[table])


def _setup(model, tables: list[list[int]]) -> int:
    """A pool of the tables' blocks and one more (the padding rows'), every block not in a table
    NaN: a read outside a row's table or length shows."""
    n_blocks = len(tables) * CTX // BS + 1
    model.setup_caches(3, CTX, n_blocks=n_blocks, block_size=BS)
    used = sorted({b for t in tables for b in t[: math.ceil((max(LENGTHS) + STEPS) / BS)]})
    trash = n_blocks - 1
    for plane in model.kv._planes():
        if plane.dtype.is_floating_point:
            plane.fill_(float("nan"))
        for b in used + [trash]:
            plane[:, :, b].zero_()
    return trash


def test_padded_step_equals_the_batched_decode(lm):
    model = lm.model
    toks = prompts()
    tables = [t[:8] for t in scattered_tables(3, 3 * CTX // BS, seed=11)]  # tables hold only what is used
    trash = _setup(model, tables)
    _prefill(model, toks, tables)
    want = []
    for s in range(STEPS):
        pos = torch.tensor([[n + s] for n in LENGTHS])
        batch = torch.cat([t[:, n + s : n + s + 1] for t, n in zip(toks, LENGTHS)])
        want.append(model(batch, pos, tables=tables)[:, -1])

    assert _setup(model, tables) == trash
    _prefill(model, toks, tables)
    graphs = DecodeGraphs(model, trash, capture=False)
    trash_before = [p[:, :, trash].clone() for p in model.kv._planes()]
    for s in range(STEPS):
        got = graphs([int(t[0, n + s]) for t, n in zip(toks, LENGTHS)], [n + s for n in LENGTHS], tables)
        assert got.shape[0] == 3 and bool(torch.isfinite(got).all())
        torch.testing.assert_close(got, want[s], atol=2e-5, rtol=1e-5)
    # the padding row (batch 3 -> bucket 4) wrote its token's entry at position 0 of the trash block
    changed = [not torch.equal(a, p[:, :, trash]) for a, p in zip(trash_before, model.kv._planes())]
    assert any(changed)


def test_buckets():
    assert [bucket(n, (1, 2, 4, 8)) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    with pytest.raises(ValueError, match="beyond the largest"):
        bucket(9, (1, 2, 4, 8))
    assert [width(b, 16) for b in (1, 2, 3, 5, 9, 17)] == [1, 2, 4, 8, 16, 16]


def test_engine_with_the_padded_step_generates_the_same_text(tiny_model):
    lm = load_model(tiny_model("llama"), context=128, progress=False, reference=True)
    prompts_ = [[1, 5, 9, 13], [1, 7] * 9, [1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]]

    def texts(graphs: bool) -> list[list[int]]:
        engine = Engine(lm, max_queue=8, config=SchedulerConfig(slots=3, block_size=8, decode_graphs=graphs,
                                                               cache_ram_bytes=0))
        try:
            assert (engine.sched.graphs is not None) is graphs

            async def go():
                return await asyncio.gather(*(result(engine, req(p, max_tokens=24, ban_eos=True, seed=4,
                                                                  sampling=SamplingParams(temperature=0.7))) for p in prompts_))

            outs = asyncio.run(go())
            return [o.choices[0].token_ids for o in outs]
        finally:
            engine.close()

    plain, padded = texts(False), texts(True)
    assert plain == padded and all(len(t) == 24 for t in plain)


def test_the_padding_block_is_outside_the_pools_counts(tiny_model):
    lm = load_model(tiny_model("llama"), context=128, progress=False, reference=True)
    engine = Engine(lm, max_queue=4, config=SchedulerConfig(slots=2, block_size=8, decode_graphs=True,
                                                           cache_ram_bytes=0))
    try:
        pool = engine.sched.pool
        assert pool.reserved == {engine.sched.graphs.trash}
        st = pool.stats()
        assert st.total == pool.n_blocks - 1 and st.free + st.cached + st.held == st.total
        pool.check([s.table for s in engine.sched.slots])
        with pytest.raises(ValueError, match="beyond the cache"):
            engine.sched.graphs([1], [128], [lm.model.row_table(0)])
    finally:
        engine.close()
    with pytest.raises(ValueError, match="more than the largest graph bucket"):
        Engine(lm, config=SchedulerConfig(slots=300, block_size=8, decode_graphs=True, pool_tokens=4096))
