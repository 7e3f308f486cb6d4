"""The batch sampler against the host chain (:func:`nkat_runtime.sampling.chain.candidates`):
the same candidates with the same probabilities for every setting it takes, the same greedy
token, draws that follow those probabilities, and a seeded row's tokens independent of the
batch around it."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from nkat_runtime.sampling import chain
from nkat_runtime.sampling.batched import Row, batchable, candidates, sample_batch
from nkat_runtime.sampling.chain import make_generator
from nkat_runtime.sampling.params import REP_PEN, TEMPERATURE, TOP_K, TOP_P, SamplingParams

V = 300


def _logits(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, generator=g) * 3.0


def _history(seed: int, n: int = 40) -> list[int]:
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randint(0, 60, (n,), generator=g).tolist()  # repeats: the penalties have work


def _host_probs(logits: torch.Tensor, p: SamplingParams, history: list[int]) -> torch.Tensor:
    got = chain.candidates(logits, p, history)
    assert not isinstance(got, int)
    vals, ids = got
    return torch.zeros(V).index_put_((ids,), torch.softmax(vals, dim=-1))


def _batch_probs(logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    vals, ids, _ = candidates(logits, rows)
    return torch.zeros(len(rows), V).scatter_(1, ids, torch.softmax(vals, dim=1))


SETTINGS = [
    SamplingParams(),
    SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0),
    SamplingParams(temperature=0.4, top_k=1, top_p=1.0, min_p=0.0),
    SamplingParams(temperature=1.7, top_k=0, top_p=0.5, min_p=0.0),
    SamplingParams(temperature=1.0, top_k=25, top_p=0.9, min_p=0.1),
    SamplingParams(temperature=1.2, top_k=0, top_p=1.0, min_p=0.2, repeat_penalty=1.3, repeat_last_n=16),
    SamplingParams(temperature=0.9, repeat_penalty=1.5, repeat_slope=0.3, repeat_last_n=-1),
    SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, presence_penalty=0.7, frequency_penalty=0.4),
    SamplingParams(temperature=1.0, repeat_penalty=0.8, repeat_last_n=0),  # window 0: no penalty at all
    SamplingParams(temperature=1.0, top_k=0, min_p=0.0, logit_bias={3: 8.0, 5: -100.0, 9999: 4.0},
                   banned_ids=frozenset({int(torch.argmax(_logits(0)))})),
]


@pytest.mark.parametrize("k", range(len(SETTINGS)))
def test_candidates_equal_the_host_chain(k: int) -> None:
    p = SETTINGS[k]
    assert batchable(p)
    logits = torch.stack([_logits(s) for s in range(4)])
    rows = [Row(p, _history(s)) for s in range(4)]
    got = _batch_probs(logits, rows)
    for b in range(4):
        torch.testing.assert_close(got[b], _host_probs(logits[b], p, rows[b].history), atol=1e-6, rtol=1e-5)


def test_a_mixed_batch_equals_each_row_alone() -> None:
    logits = torch.stack([_logits(s) for s in range(len(SETTINGS))])
    rows = [Row(p, _history(s)) for s, p in enumerate(SETTINGS)]
    together = _batch_probs(logits, rows)
    for b, row in enumerate(rows):
        torch.testing.assert_close(together[b], _batch_probs(logits[b : b + 1], [row])[0], atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(together[b], _host_probs(logits[b], row.params, list(row.history)),
                                   atol=1e-6, rtol=1e-5)


def test_greedy_rows_take_the_host_token() -> None:
    greedy = SamplingParams.greedy()
    kinds = [greedy, dataclasses.replace(greedy, repeat_penalty=1.4), dataclasses.replace(greedy, presence_penalty=2.0),
             dataclasses.replace(greedy, logit_bias={7: 30.0}), dataclasses.replace(greedy, top_k=5, top_p=0.3)]
    for seed, p in itertools.product(range(6), kinds):
        logits, history = _logits(seed), _history(seed)
        assert batchable(p)
        assert sample_batch(logits[None], [Row(p, history)]) == [chain.sample(logits, p, history)]


def test_everything_banned_and_overflow_fall_back_as_the_host_does() -> None:
    logits = _logits(3)
    everything = SamplingParams(temperature=1.0, banned_ids=frozenset(range(V)))
    tiny = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1e-38, repeat_last_n=-1)
    history = _history(3)
    for p in (everything, tiny):
        assert sample_batch(logits[None], [Row(p, history, make_generator(1))]) == [chain.sample(logits, p, history)]


def test_draws_follow_the_probabilities() -> None:
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -30.0])
    want = torch.softmax(logits, dim=0)
    g = make_generator(11)
    n = 4000
    draws = torch.tensor([sample_batch(logits[None], [Row(p, (), g)])[0] for _ in range(n)])
    freq = torch.bincount(draws, minlength=6).float() / n
    assert float((freq - want).abs().max()) < 0.03, (freq, want)
    assert int(freq[5]) == 0


def test_a_seeded_row_ignores_its_batch() -> None:
    p = SamplingParams(temperature=1.0)
    logits = torch.stack([_logits(s) for s in range(5)])
    alone = [sample_batch(logits[2:3], [Row(p, (), g)])[0] for g in [make_generator(5)] for _ in range(20)]
    g, others = make_generator(5), [make_generator(100 + s) for s in range(5)]
    together = []
    for _ in range(20):
        rows = [Row(p, (), others[b]) for b in range(5)]
        rows[2] = Row(p, (), g)
        together.append(sample_batch(logits, rows)[2])
    assert together == alone
    assert len(set(alone)) > 1  # a real draw, not the argmax
    # other rows with other top-k (so another candidate width) do not move a seeded row's stream
    narrow = SamplingParams(temperature=1.0, top_k=40)
    alone = [sample_batch(logits[:1], [Row(narrow, (), g)])[0] for g in [make_generator(6)] for _ in range(10)]
    g, wide = make_generator(6), make_generator(7)
    mixed = [sample_batch(logits[:2], [Row(narrow, (), g), Row(SamplingParams(temperature=1.0, top_k=0), (), wide)])[0]
             for _ in range(10)]
    assert mixed == alone


def test_a_banned_token_with_a_bias_stays_banned() -> None:
    logits = _logits(2)
    top = int(torch.argmax(logits))
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, logit_bias={top: 5.0}, banned_ids=frozenset({top}))
    vals, ids, best = candidates(logits[None], [Row(p, ())])
    assert float(vals[0][ids[0] == top].max()) == float("-inf") and int(best[0]) != top


def test_long_penalty_windows_stay_cheap() -> None:
    """Counts come from a scatter over the vocabulary, not a window x window comparison."""
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.2, repeat_last_n=-1,
                       presence_penalty=0.3)
    history = torch.randint(0, V, (20000,), generator=torch.Generator().manual_seed(0)).tolist()
    got = _batch_probs(_logits(1)[None], [Row(p, history)])[0]
    torch.testing.assert_close(got, _host_probs(_logits(1), p, history), atol=1e-6, rtol=1e-5)


def test_what_is_left_to_the_host() -> None:
    base = SamplingParams()
    assert batchable(SamplingParams.greedy())
    for change in ({"mirostat": 2}, {"dry_multiplier": 0.8}, {"xtc_probability": 0.5}, {"top_a": 0.2},
                   {"typical": 0.9}, {"tfs": 0.9}, {"top_n_sigma": 1.0}, {"dynatemp_range": 0.5},
                   {"smoothing_factor": 0.3},
                   {"sampler_order": (TOP_K, REP_PEN, TOP_P, TEMPERATURE), "repeat_penalty": 1.1},
                   {"sampler_order": (TOP_K, TOP_P)},  # temperature not in the order: not applied on the host
                   {"sampler_order": (REP_PEN, TOP_P, TOP_K, TEMPERATURE)},
                   # penalties after another step: the host applies them to the prefiltered top 5000 only
                   {"sampler_order": (TOP_K, REP_PEN, TOP_P, TEMPERATURE), "presence_penalty": 1.0, "top_k": 0}):
        assert not batchable(dataclasses.replace(base, **change)), change
    # a step that does nothing may sit anywhere
    assert batchable(dataclasses.replace(base, sampler_order=(TOP_K, REP_PEN, TOP_P, TEMPERATURE)))


def test_greedy_and_drawn_rows_in_one_batch() -> None:
    greedy, hot = SamplingParams.greedy(), SamplingParams(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0)
    logits = torch.stack([_logits(s) for s in range(4)])
    kinds = [greedy, hot, greedy, hot]
    got = sample_batch(logits, [Row(p, _history(b), make_generator(9 + b)) for b, p in enumerate(kinds)])
    for b, p in enumerate(kinds):
        alone = sample_batch(logits[b : b + 1], [Row(p, _history(b), make_generator(9 + b))])[0]
        assert got[b] == alone
        if p is greedy:
            assert got[b] == chain.sample(logits[b], p, _history(b))
