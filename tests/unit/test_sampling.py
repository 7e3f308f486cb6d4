"""Sampling filters and stop-string handling (pure functions, no model)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from nkat_runtime.sampling.chain import (
    make_generator,
    min_p_filter,
    sample,
    top_k_filter,
    top_p_filter,
)
from nkat_runtime.sampling.params import SamplingParams
from nkat_runtime.serve.sequence import StopMatcher

LOGITS = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03]))


def kept(logits: torch.Tensor) -> list[int]:
    return [i for i, v in enumerate(logits.tolist()) if v != -math.inf]


def test_top_k():
    assert kept(top_k_filter(LOGITS, 2)) == [0, 1]
    assert kept(top_k_filter(LOGITS, 0)) == [0, 1, 2, 3, 4]


def test_top_p_keeps_smallest_set_reaching_p():
    assert kept(top_p_filter(LOGITS, 0.5)) == [0]
    assert kept(top_p_filter(LOGITS, 0.7)) == [0, 1]
    assert kept(top_p_filter(LOGITS, 0.76)) == [0, 1, 2]
    assert kept(top_p_filter(LOGITS, 1.0)) == [0, 1, 2, 3, 4]


def test_min_p_relative_to_top():
    assert kept(min_p_filter(LOGITS, 0.2)) == [0, 1, 2]  # 0.07 < 0.2 * 0.5
    assert kept(min_p_filter(LOGITS, 0.0)) == [0, 1, 2, 3, 4]


def test_greedy_and_seeded_sampling():
    assert sample(LOGITS, SamplingParams.greedy()) == 0
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    a = [sample(LOGITS, p, generator=make_generator(7)) for _ in range(5)]
    b = [sample(LOGITS, p, generator=make_generator(7)) for _ in range(5)]
    assert a == b
    draws = torch.tensor([sample(LOGITS, p, generator=g) for g in [make_generator(11)] for _ in range(4000)])
    freq = torch.bincount(draws, minlength=5).float() / 4000
    assert torch.allclose(freq, LOGITS.exp(), atol=0.03)


def test_invalid_params():
    for bad in (dict(temperature=-1), dict(top_p=0.0), dict(min_p=2.0), dict(top_k=-3), dict(repeat_penalty=0)):
        with pytest.raises(ValueError):
            SamplingParams(**bad).validate()


def test_stop_matcher():
    m = StopMatcher(["\n\nUser:", "###"])
    assert m.safe_length("Hello\n") == 5  # "\n" may start a stop string
    assert m.safe_length("Hello #") == 6
    assert m.safe_length("Hello") == 5
    assert m.find("abc ### def", 0) == (4, "###")
    assert m.find("x\n\nUser: hi", 0) == (1, "\n\nUser:")
    assert m.find("no stop here", 0) is None


# --- the Kobold.cpp sampler set (samplers_extra) and the full chain ---------------------------
from nkat_runtime.sampling import extra as sx  # noqa: E402
from nkat_runtime.sampling.chain import SamplerState  # noqa: E402
from nkat_runtime.sampling.params import DEFAULT_ORDER, TEMPERATURE, TOP_K  # noqa: E402


def test_top_a_uses_squared_max():
    # threshold 0.5 * 0.5^2 = 0.125: keeps 0.5, 0.25, 0.15
    assert kept(sx.top_a_filter(LOGITS, 0.5)) == [0, 1, 2]
    assert kept(sx.top_a_filter(LOGITS, 0.0)) == [0, 1, 2, 3, 4]


def test_typical_keeps_tokens_nearest_the_entropy():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = probs.log()
    entropy = -(probs * probs.log()).sum()
    closeness = (-probs.log() - entropy).abs().argsort().tolist()
    out = kept(sx.typical_filter(logits, 0.5))
    # the kept set is a prefix of the closeness order, the smallest whose mass exceeds 0.5
    assert out == sorted(closeness[: len(out)])
    assert probs[out].sum() > 0.5 and probs[sorted(closeness[: len(out) - 1])].sum() <= 0.5
    assert kept(sx.typical_filter(logits, 1.0)) == [0, 1, 2, 3]


def test_tail_free_cuts_the_flat_tail():
    probs = torch.tensor([0.6, 0.2, 0.1, 0.05, 0.03, 0.02])
    out = kept(sx.tfs_filter(probs.log(), 0.9))
    # |2nd derivatives| .3 .05 .03 .01 -> normalised cumulative .77 .90 .97 1: first > 0.9 at index 2,
    # and (as llama.cpp) that index is the number of tokens kept
    assert out == [0, 1]
    assert kept(sx.tfs_filter(probs.log(), 1.0)) == list(range(6))


def test_kobold_rep_pen_slope_and_presence_frequency():
    logits = torch.tensor([2.0, 2.0, -2.0, 1.0])
    # window [0, 2 | 1, 1]: the older half (0, 2) gets 1 + (2 - 1) * 0.5 = 1.5, the recent one 2
    out = sx.apply_penalties(logits, [0, 2, 1, 1], rep_pen=2.0, rep_range=4, slope=0.5)
    assert torch.allclose(out, torch.tensor([2 / 1.5, 1.0, -3.0, 1.0]))
    out = sx.apply_penalties(logits, [1, 1, 3], presence=0.5, frequency=0.25)
    assert torch.allclose(out, torch.tensor([2.0, 2.0 - 0.5 - 0.5, -2.0, 1.0 - 0.5 - 0.25]))
    # range limits the window; ids map a compacted candidate list back to token ids
    assert sx.apply_penalties(logits, [0, 3], rep_pen=2.0, rep_range=1).tolist() == [2.0, 2.0, -2.0, 0.5]
    compact = sx.apply_penalties(torch.tensor([4.0, 1.0]), [7], rep_pen=2.0, ids=torch.tensor([7, 9]))
    assert compact.tolist() == [2.0, 1.0]


def test_smoothing_and_dynamic_temperature():
    logits = torch.tensor([3.0, 2.0, 0.0])
    out = sx.smooth(logits, 1.0)  # -(d^2) + max
    assert torch.allclose(out, torch.tensor([3.0, 2.0, -6.0]))
    assert sx.smooth(logits, 0.0) is logits
    flat, peaked = torch.zeros(4), torch.tensor([10.0, 0.0, 0.0, 0.0])
    # a flat distribution has maximal entropy -> the max temperature; a peaked one nearly the min
    assert torch.allclose(sx.dynamic_temperature(flat + 1.0, 0.5, 2.0), (flat + 1.0) / 2.0)
    hot = sx.dynamic_temperature(peaked, 0.5, 2.0)
    assert hot[0] > peaked[0] / 2.0  # divided by less than the max temperature


def test_xtc_removes_top_choices_but_the_last_above_threshold():
    out = sx.xtc_filter(LOGITS, threshold=0.2, probability=1.0)
    assert kept(out) == [1, 2, 3, 4]  # 0.5 and 0.25 are above 0.2: only 0.25 stays
    assert kept(sx.xtc_filter(LOGITS, threshold=0.3, probability=1.0)) == [0, 1, 2, 3, 4]  # only one above
    assert sx.xtc_filter(LOGITS, threshold=0.6, probability=1.0) is LOGITS  # > 0.5: off
    assert sx.xtc_filter(LOGITS, threshold=0.2, probability=0.0) is LOGITS


def test_dry_penalises_the_token_that_extends_a_repeat():
    logits = torch.zeros(10)
    history = [1, 2, 3, 4, 9, 1, 2, 3]  # "1 2 3" seen before, followed by 4
    out = sx.dry_penalty(logits, history, multiplier=1.0, base=2.0, allowed_length=2)
    assert out[4] == pytest.approx(-2.0)  # match length 3: 1 * 2^(3-2)
    assert (out[[0, 1, 2, 3, 5, 6, 7, 8, 9]] == 0).all()
    # a sequence breaker inside the match stops it; too-short matches are free
    assert sx.dry_penalty(logits, history, 1.0, 2.0, 2, breakers={2})[4] == pytest.approx(0.0)
    assert sx.dry_penalty(logits, history, 1.0, 2.0, allowed_length=4)[4] == 0.0


def test_logit_bias_and_bans():
    out = sx.apply_logit_bias(LOGITS, {1: 5.0, 2: -100.0, 99: 3.0})
    assert out[1] == pytest.approx(float(LOGITS[1]) + 5) and out[2] == -math.inf
    assert kept(sx.ban_tokens(LOGITS, {0, 4})) == [1, 2, 3]


def test_top_n_sigma():
    logits = torch.tensor([10.0, 9.0, 0.0, -5.0])
    assert kept(sx.top_n_sigma_filter(logits, 0.5)) == [0, 1]


def test_mirostat_v2_truncates_by_surprise_and_moves_mu():
    gen = make_generator(0)
    for _ in range(20):  # mu = 1.5 bits: only 0.5 (1 bit) survives; the draw always picks it
        j, mu = sx.mirostat_v2(LOGITS, tau=3.0, eta=0.1, mu=1.5, generator=gen)
        assert j == 0 and mu == pytest.approx(1.5 + 0.1 * 3.0)  # surprise 0 after renormalising
    j, mu = sx.mirostat_v1(LOGITS, tau=5.0, eta=0.1, mu=10.0, n_vocab=5, generator=gen)
    assert 0 <= j < 5 and mu != 10.0


def test_chain_defaults_equal_the_old_chain_and_order_matters():
    p = SamplingParams(temperature=0.7, top_k=3, top_p=0.9, min_p=0.1, seed=1)
    assert p.sampler_order == DEFAULT_ORDER
    p.validate()
    draws = {sample(LOGITS, p, generator=make_generator(s)) for s in range(200)}
    assert draws <= {0, 1, 2}
    # temperature before top-p (order 5 first) vs after: a hot temperature flattens the
    # distribution, so top_p keeps more tokens when it runs after the temperature
    hot = SamplingParams(temperature=5.0, top_k=0, top_p=0.6, min_p=0.0)
    late = {sample(LOGITS, hot, generator=make_generator(s)) for s in range(300)}
    early = dataclasses.replace(hot, sampler_order=(TEMPERATURE, TOP_K, 2))
    assert len({sample(LOGITS, early, generator=make_generator(s)) for s in range(300)}) > len(late)


def test_greedy_respects_bias_bans_and_mirostat_state():
    greedy = SamplingParams.greedy()
    assert sample(LOGITS, dataclasses.replace(greedy, banned_ids=frozenset({0}))) == 1
    assert sample(LOGITS, dataclasses.replace(greedy, logit_bias={3: 10.0})) == 3
    state = SamplerState()
    miro = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, mirostat=2, mirostat_tau=3.0)
    sample(LOGITS, miro, generator=make_generator(1), state=state)
    assert state.mu is not None and state.mu != 6.0
    everything = dataclasses.replace(greedy, banned_ids=frozenset(range(5)))
    assert sample(LOGITS, everything) == 0  # all banned: the raw argmax rather than a crash


def test_new_params_validate():
    for bad in (dict(top_a=2.0), dict(typical=0.0), dict(tfs=1.5), dict(mirostat=3), dict(sampler_order=(9,)),
                dict(xtc_probability=2.0), dict(dry_multiplier=-1.0)):
        with pytest.raises(ValueError):
            SamplingParams(**bad).validate()
