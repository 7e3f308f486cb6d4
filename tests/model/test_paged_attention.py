"""Attention over block tables equals attention over a contiguous cache: scattered blocks of 4
positions, ragged lengths across block boundaries, batched decode, moves (context shift)."""

from __future__ import annotations

import random

import pytest
import torch

from nkat_runtime.loader import load_model

BS = 4
CTX = 64
LENGTHS = (5, 13, 22)  # prompts ending inside the 2nd, 4th and 6th blocks


def scattered_tables(n_seq: int, n_blocks: int, seed: int = 3) -> list[list[int]]:
    """Each sequence a table of pool blocks in random order, the sequences interleaved."""
    order = list(range(n_blocks))
    random.Random(seed).shuffle(order)
    per = CTX // BS
    return [order[i * per : (i + 1) * per] for i in range(n_seq)]


@pytest.fixture(scope="module", params=[("llama", "f32"), ("gemma3", "f32"), ("llama", "bf16")],
                ids=lambda p: "-".join(p))
def lm(request, tiny_model):
    arch, kind = request.param
    return load_model(tiny_model(arch), context=CTX, progress=False, reference=True, cache_types=(kind, kind))


def prompts() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, 200, (1, n + 8), generator=g) for n in LENGTHS]


def run_alone(model, toks: torch.Tensor, n: int, steps: int, table=None, row=None) -> torch.Tensor:
    """Prefill ``n`` tokens in two chunks (one ends mid-block), then decode ``steps`` tokens."""
    kw = {"tables": [table]} if table is not None else {"rows": [row]}
    cut = n // 2 + 1
    out = [model(toks[:, :cut], torch.arange(cut), **kw)[0, -1], model(toks[:, cut:n], torch.arange(cut, n), **kw)[0, -1]]
    for s in range(steps):
        p = n + s
        out.append(model(toks[:, p : p + 1], torch.tensor([[p]]), **kw)[0, -1])
    return torch.stack(out)


def test_scattered_tables_equal_the_contiguous_cache(lm):
    model = lm.model
    model.setup_caches(1, CTX, block_size=BS)  # one row of consecutive blocks
    refs = [run_alone(model, t, n, 8, row=0) for t, n in zip(prompts(), LENGTHS)]
    model.setup_caches(3, CTX, n_blocks=3 * CTX // BS, block_size=BS)
    tables = scattered_tables(3, 3 * CTX // BS)
    for ref, t, n, table in zip(refs, prompts(), LENGTHS, tables):
        got = run_alone(model, t, n, 8, table=table)
        assert torch.equal(got, ref), float((got - ref).abs().max())


def test_ragged_batched_decode_over_scattered_blocks(lm):
    """Three sequences of different lengths decode together, each through its own scattered
    table, and get what each gets alone (and what a contiguous cache gives)."""
    model = lm.model
    model.setup_caches(1, CTX, block_size=BS)
    refs = [run_alone(model, t, n, 8, row=0)[2:] for t, n in zip(prompts(), LENGTHS)]
    model.setup_caches(3, CTX, n_blocks=3 * CTX // BS, block_size=BS)
    tables = scattered_tables(3, 3 * CTX // BS, seed=11)
    toks = prompts()
    for t, n, table in zip(toks, LENGTHS, tables):
        model(t[:, : n // 2 + 1], torch.arange(n // 2 + 1), tables=[table])
        model(t[:, n // 2 + 1 : n], torch.arange(n // 2 + 1, n), tables=[table])
    steps = []
    for s in range(8):
        pos = torch.tensor([[n + s] for n in LENGTHS])
        batch = torch.cat([t[:, n + s : n + s + 1] for t, n in zip(toks, LENGTHS)])
        steps.append(model(batch, pos, tables=tables)[:, -1])
    got = torch.stack(steps, dim=1)  # [3, steps, V]
    for b, ref in enumerate(refs):
        assert torch.equal(got[b], ref), float((got[b] - ref).abs().max())


def test_a_move_through_a_table_equals_the_move_in_a_row(lm):
    model = lm.model
    toks = prompts()[2]
    model.setup_caches(1, CTX, block_size=BS)
    model(toks[:, :22], torch.arange(22), rows=[0])
    model.shift_kv(0, 9, 2, 13)  # across blocks, overlapping source and destination
    ref = model.read_kv(0, 15)
    model.setup_caches(2, CTX, n_blocks=2 * CTX // BS, block_size=BS)
    table = scattered_tables(2, 2 * CTX // BS, seed=7)[1]
    model(toks[:, :22], torch.arange(22), tables=[table])
    model.shift_kv(table, 9, 2, 13)
    got = model.read_kv(table, 15)
    assert all(torch.equal(a, b) for la, lb in zip(ref, got) for a, b in zip(la, lb))
