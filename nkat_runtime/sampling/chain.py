"""Sampling: pure functions over a logits vector (the settings are in :mod:`.params`).

The chain (KoboldCpp's, which contains llama.cpp's default one):

    logit bias / bans → DRY → [mirostat: penalties → temperature → mirostat]
    or: top-5000 prefilter → ``sampler_order`` (default: penalties → top-k → top-a → TFS →
    typical → top-p + min-p → temperature) → XTC → draw.

With the new samplers at their defaults (off), this is exactly the old chain: repetition
penalty → top-k → top-p → min-p → temperature. ``temperature <= 0`` is greedy: the argmax of
what the chain leaves. The extra samplers live in :mod:`.extra`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from . import extra as sx
from .params import DEFAULT_ORDER, REP_PEN, TEMPERATURE, TFS, TOP_A, TOP_K, TOP_P, TYPICAL, SamplingParams

PREFILTER = 5000  # candidates kept before the order list runs (KoboldCpp does the same)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.numel():
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``p`` (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    cum = torch.cumsum(probs, dim=-1)
    remove = (cum - probs) >= p  # drop a token once the mass before it already reached p
    remove[0] = False
    out = logits.clone()
    out[order[remove]] = float("-inf")
    return out


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below ``min_p`` times the most likely one's."""
    if min_p <= 0.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    return logits.masked_fill(probs < min_p * probs.max(), float("-inf"))


@dataclass
class SamplerState:
    """What a sampler carries from one token to the next within one generation (mirostat's mu)."""

    mu: float | None = None


def _order_step(vals: torch.Tensor, ids: torch.Tensor, step: int, p: SamplingParams, history: Sequence[int],
                penalties_done: bool) -> torch.Tensor:
    if step == TOP_K:
        return top_k_filter(vals, p.top_k)
    if step == TOP_A:
        return sx.top_a_filter(vals, p.top_a)
    if step == TOP_P:
        return min_p_filter(top_p_filter(vals, p.top_p), p.min_p)
    if step == TFS:
        return sx.tfs_filter(vals, p.tfs)
    if step == TYPICAL:
        return sx.typical_filter(vals, p.typical)
    if step == TEMPERATURE:
        vals = sx.top_n_sigma_filter(vals, p.top_n_sigma)
        if p.dynatemp_range > 0:
            return sx.dynamic_temperature(vals, p.temperature - p.dynatemp_range, p.temperature + p.dynatemp_range,
                                          p.dynatemp_exponent, p.smoothing_factor, p.smoothing_curve)
        if p.temperature > 0:
            return sx.apply_temperature(vals, p.temperature, p.smoothing_factor, p.smoothing_curve)
        return vals
    if step == REP_PEN and not penalties_done:
        return _penalties(vals, p, history, ids)
    return vals


def _penalizing(p: SamplingParams) -> bool:
    return p.repeat_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _penalties(logits: torch.Tensor, p: SamplingParams, history: Sequence[int], ids: torch.Tensor | None) -> torch.Tensor:
    return sx.apply_penalties(logits, history, p.repeat_penalty, p.repeat_last_n, p.repeat_slope,
                              p.presence_penalty, p.frequency_penalty, ids)


def candidates(
    logits: torch.Tensor,
    params: SamplingParams,
    history: Sequence[int] = (),
    generator: torch.Generator | None = None,
    state: SamplerState | None = None,
) -> int | tuple[torch.Tensor, torch.Tensor]:
    """The chain on one row of logits [V] up to the draw: the token where the chain decides on
    its own (greedy, mirostat, everything banned), else the final candidate logits (-inf:
    removed) and their token ids."""
    p = params
    logits = logits.detach().float().cpu()  # one row; the generator and the id bookkeeping live on the CPU
    x = logits
    x = sx.ban_tokens(sx.apply_logit_bias(x, p.logit_bias), p.banned_ids)
    x = sx.dry_penalty(x, history, p.dry_multiplier, p.dry_base, p.dry_allowed_length, p.dry_penalty_last_n,
                       p.dry_breakers)
    order = p.sampler_order or DEFAULT_ORDER
    penalties_first = p.mirostat in (1, 2) or order[0] == REP_PEN
    if penalties_first and (REP_PEN in order or p.mirostat):
        x = _penalties(x, p, history, None)
    if p.greedy_mode and p.xtc_probability <= 0 and not (REP_PEN in order and _penalizing(p)):
        # every filter keeps the top token and temperature 0 takes it: skip the chain
        best = int(torch.argmax(x))
        return best if bool(torch.isfinite(x[best])) else int(torch.argmax(logits))  # everything banned: raw argmax
    if not bool(torch.isfinite(x).any()):  # everything banned: fall back to the raw argmax
        return int(torch.argmax(logits))
    vals, ids = torch.topk(x, min(PREFILTER, x.numel()))
    if p.mirostat in (1, 2):
        if p.temperature <= 0:
            return int(ids[0])
        vals = sx.apply_temperature(vals, p.temperature, p.smoothing_factor, p.smoothing_curve)
        st = state if state is not None else SamplerState()
        mu = 2.0 * p.mirostat_tau if st.mu is None else st.mu
        if p.mirostat == 1:
            j, st.mu = sx.mirostat_v1(vals, p.mirostat_tau, p.mirostat_eta, mu, x.numel(), generator)
        else:
            j, st.mu = sx.mirostat_v2(vals, p.mirostat_tau, p.mirostat_eta, mu, generator)
        return int(ids[j])
    for step in order:
        vals = _order_step(vals, ids, step, p, history, penalties_first)
    vals = sx.xtc_filter(vals, p.xtc_threshold, p.xtc_probability, generator)
    if p.greedy_mode:
        return int(ids[int(torch.argmax(vals))])
    return vals, ids


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    history: Sequence[int] = (),
    generator: torch.Generator | None = None,
    state: SamplerState | None = None,
) -> int:
    """Pick the next token from one row of logits [V] (see the module docstring for the chain)."""
    got = candidates(logits, params, history, generator, state)
    if isinstance(got, int):
        return got
    vals, ids = got
    probs = torch.softmax(vals, dim=-1)
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
        # extreme settings (a temperature near float max, a zero penalty) overflowed the chain:
        # take the best finite candidate rather than fail the request
        finite = torch.where(torch.isnan(vals), torch.full_like(vals, float("-inf")), vals)
        return int(ids[int(torch.argmax(finite))]) if bool(torch.isfinite(finite).any()) else int(torch.argmax(logits))
    return int(ids[int(torch.multinomial(probs, 1, generator=generator))])


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None or seed < 0:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    return gen
