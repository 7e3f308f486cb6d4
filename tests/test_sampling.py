"""Sampling filters and stop-string handling (pure functions, no model)."""

from __future__ import annotations

import math

import pytest
import torch

from nkat_runtime.generation import StopMatcher
from nkat_runtime.sampling import (
    SamplingParams,
    apply_repeat_penalty,
    make_generator,
    min_p_filter,
    sample,
    top_k_filter,
    top_p_filter,
)

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


def test_repeat_penalty_llama_cpp_rule():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_repeat_penalty(logits, [0, 1, 1], penalty=2.0, last_n=64)
    assert out.tolist() == [1.0, -4.0, 1.0]
    assert apply_repeat_penalty(logits, [0], penalty=2.0, last_n=0).tolist() == logits.tolist()


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
