"""The Kobold.cpp sampler set beyond llama.cpp's basic chain: pure functions over a logits vector.

Every function takes float logits ``[N]`` (a removed candidate is ``-inf``) and returns a new
tensor; none changes its input. Where a function needs token ids (penalties, DRY, bias) and the
vector is a compacted candidate list, ``ids`` maps its positions to token ids (``None``: the
position *is* the token id). The semantics follow KoboldCpp's ``gpttype_adapter.cpp``
(llama.cpp's for the samplers both share); references are in the docstrings.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Collection, Mapping, Sequence

import torch

NEG_INF = float("-inf")
BAN_BIAS = -100.0  # a logit bias at or below this bans the token (OpenAI: "-100 should ban")


def _positions(ids: torch.Tensor | None, wanted: Collection[int], n: int) -> torch.Tensor:
    """Positions in a vector of length ``n`` whose token id is in ``wanted``."""
    if not wanted:
        return torch.empty(0, dtype=torch.long)
    want = torch.tensor(sorted(wanted), dtype=torch.long)
    if ids is None:
        return want[(want >= 0) & (want < n)]
    return torch.nonzero(torch.isin(ids, want), as_tuple=True)[0]


def apply_logit_bias(logits: torch.Tensor, bias: Mapping[int, float]) -> torch.Tensor:
    """Add ``bias[id]`` to each listed token (ids outside the vocabulary are ignored); a bias of
    -100 or less bans the token outright."""
    if not bias:
        return logits
    out = logits.clone()
    n = out.numel()
    for tok, b in bias.items():
        if 0 <= tok < n:
            out[tok] = NEG_INF if b <= BAN_BIAS else out[tok] + b
    return out


def ban_tokens(logits: torch.Tensor, banned: Collection[int], ids: torch.Tensor | None = None) -> torch.Tensor:
    """Set the listed tokens to ``-inf``."""
    pos = _positions(ids, banned, logits.numel())
    if pos.numel() == 0:
        return logits
    out = logits.clone()
    out[pos] = NEG_INF
    return out


def apply_penalties(
    logits: torch.Tensor,
    history: Sequence[int],
    rep_pen: float = 1.0,
    rep_range: int = -1,
    slope: float = 1.0,
    presence: float = 0.0,
    frequency: float = 0.0,
    ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """KoboldCpp's repetition penalty, plus OpenAI's presence/frequency penalties.

    Looks at the last ``rep_range`` tokens of ``history`` (``-1``: all, ``0``: none). The recent
    half gets ``rep_pen``, the older half ``1 + (rep_pen - 1) * slope`` (slope 1 = one tier);
    a seen token's positive logit is divided by the penalty, a non-positive one multiplied. Then
    ``presence`` is subtracted once and ``frequency`` once per occurrence in the window.
    """
    if rep_pen == 1.0 and presence == 0.0 and frequency == 0.0:
        return logits
    window = list(history) if rep_range < 0 else list(history[-rep_range:]) if rep_range else []
    if not window:
        return logits
    split = len(window) // 2
    near, far = set(window[split:]), set(window[:split]) - set(window[split:])
    reduced = 1.0 + (rep_pen - 1.0) * slope if rep_pen > 1.0 else rep_pen
    out = logits.clone()
    n = out.numel()
    for group, pen in ((near, rep_pen), (far, reduced)):
        pos = _positions(ids, group, n)
        if pos.numel() and pen != 1.0:
            vals = out[pos]
            out[pos] = torch.where(vals <= 0, vals * pen, vals / pen)
    if presence or frequency:
        counts = Counter(window)
        for tok, count in counts.items():
            pos = _positions(ids, (tok,), n)
            if pos.numel():
                out[pos] -= presence + frequency * count
    return out


def top_a_filter(logits: torch.Tensor, a: float) -> torch.Tensor:
    """Drop tokens whose probability is below ``a * p_max**2`` (keeps at least the top one)."""
    if a <= 0.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    pmax = probs.max()
    return logits.masked_fill(probs < a * pmax * pmax, NEG_INF)


def typical_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Locally typical sampling: keep the tokens whose surprise is closest to the entropy,
    the smallest such set whose probability exceeds ``p`` (off at ``p >= 1``)."""
    if p >= 1.0 or p <= 0.0:
        return logits
    logp = torch.log_softmax(logits, dim=-1)
    probs = logp.exp()
    finite = torch.isfinite(logp)
    entropy = -(probs[finite] * logp[finite]).sum()
    shifted = torch.where(finite, (-logp - entropy).abs(), torch.full_like(logp, math.inf))
    order = torch.argsort(shifted)
    cum = torch.cumsum(probs[order], dim=-1)
    over = torch.nonzero(cum > p, as_tuple=True)[0]
    keep_n = int(over[0]) + 1 if over.numel() else order.numel()
    out = torch.full_like(logits, NEG_INF)
    kept = order[:keep_n]
    out[kept] = logits[kept]
    return out


def tfs_filter(logits: torch.Tensor, z: float) -> torch.Tensor:
    """Tail-free sampling: cut where the normalised |second derivative| of the sorted
    probabilities has accumulated ``z`` (off at ``z >= 1``)."""
    n_finite = int(torch.isfinite(logits).sum())
    if z >= 1.0 or z <= 0.0 or n_finite <= 2:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)[:n_finite]
    second = (probs[:-1] - probs[1:])
    second = (second[:-1] - second[1:]).abs()
    total = second.sum()
    if total <= 1e-12:
        return logits
    cum = torch.cumsum(second / total, dim=-1)
    over = torch.nonzero(cum > z, as_tuple=True)[0]
    keep_n = max(1, int(over[0])) if over.numel() else n_finite
    out = torch.full_like(logits, NEG_INF)
    kept = order[:keep_n]
    out[kept] = logits[kept]
    return out


def smooth(logits: torch.Tensor, factor: float, curve: float = 1.0) -> torch.Tensor:
    """Quadratic ("smoothing") sampling: ``-(k f d^2) + (s f d^3) + max`` with ``d = logit - max``,
    ``k = (3 - curve) / 2``, ``s = (curve - 1) / 2`` (curve 1 = plain quadratic)."""
    if factor <= 0.0 or int(torch.isfinite(logits).sum()) <= 1:
        return logits
    h = logits.max()
    d = logits - h
    k, s = (3.0 - curve) / 2.0, (curve - 1.0) / 2.0
    out = -(k * factor * d * d) + (s * factor * d * d * d) + h
    return torch.where(torch.isfinite(logits), out, logits)


def apply_temperature(logits: torch.Tensor, temp: float, smoothing: float = 0.0, curve: float = 1.0) -> torch.Tensor:
    """Divide by ``temp`` (> 0), then apply smoothing (KoboldCpp's order)."""
    return smooth(logits / temp, smoothing, curve)


def dynamic_temperature(
    logits: torch.Tensor, min_temp: float, max_temp: float, exponent: float = 1.0,
    smoothing: float = 0.0, curve: float = 1.0,
) -> torch.Tensor:
    """Entropy-scaled temperature: ``min + (max - min) * (H / H_max) ** exponent``, where ``H`` is
    the entropy of the candidates and ``H_max = log(#candidates)``."""
    min_temp, max_temp, exponent = max(0.0, min_temp), max(0.0, max_temp), max(0.0, exponent)
    finite = torch.isfinite(logits)
    n = int(finite.sum())
    if n <= 1:
        return logits
    logp = torch.log_softmax(logits, dim=-1)
    entropy = float(-(logp[finite].exp() * logp[finite]).sum())
    normalised = entropy / math.log(n)
    temp = min_temp + (max_temp - min_temp) * normalised ** exponent
    return apply_temperature(logits, max(temp, 1.0 / 256), smoothing, curve)


def xtc_filter(
    logits: torch.Tensor, threshold: float, probability: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Exclude Top Choices: with chance ``probability``, remove every token at or above
    ``threshold`` probability except the least likely of them (needs two or more above it).
    Off when ``threshold > 0.5`` or ``probability <= 0``."""
    if threshold > 0.5 or probability <= 0.0 or int(torch.isfinite(logits).sum()) < 2:
        return logits
    if float(torch.rand((), generator=generator)) >= probability:
        return logits
    probs = torch.softmax(logits, dim=-1)
    above = torch.nonzero(probs >= threshold, as_tuple=True)[0]
    if above.numel() < 2:
        return logits
    keep = above[torch.argmin(probs[above])]
    out = logits.clone()
    out[above[above != keep]] = NEG_INF
    return out


def dry_penalty(
    logits: torch.Tensor,
    history: Sequence[int],
    multiplier: float,
    base: float = 1.75,
    allowed_length: int = 2,
    last_n: int = 0,
    breakers: Collection[int] = (),
) -> torch.Tensor:
    """DRY ("don't repeat yourself"): a token that would extend a repeat of an earlier sequence
    ending with the same tokens as the text does now is penalised by
    ``multiplier * base ** (match_length - allowed_length)`` once the match is at least
    ``allowed_length`` long. Matches never cross a sequence-breaker token. ``last_n <= 0``: the
    whole history."""
    if multiplier <= 0.0 or len(history) < 2:
        return logits
    seq = list(history[-last_n:]) if last_n > 0 else list(history)
    last = seq[-1]
    if last in breakers:
        return logits
    arr = torch.tensor(seq[:-1], dtype=torch.long)
    best: dict[int, int] = {}
    n = len(seq)
    for i in torch.nonzero(arr == last, as_tuple=True)[0].tolist():
        nxt = seq[i + 1]
        if nxt in breakers:
            continue
        length = 1
        while i - length >= 0 and length < n - 1:
            a, b = seq[i - length], seq[n - 1 - length]
            if a != b or a in breakers:
                break
            length += 1
        if length > best.get(nxt, 0):
            best[nxt] = length
    out = logits
    for tok, length in best.items():
        if length >= allowed_length and 0 <= tok < logits.numel():
            if out is logits:
                out = logits.clone()
            out[tok] -= multiplier * base ** (length - allowed_length)
    return out


def top_n_sigma_filter(logits: torch.Tensor, n_sigma: float) -> torch.Tensor:
    """Keep tokens whose logit is within ``n_sigma`` standard deviations of the maximum."""
    finite = torch.isfinite(logits)
    if n_sigma <= 0.0 or int(finite.sum()) <= 1:
        return logits
    vals = logits[finite]
    return logits.masked_fill(logits < vals.max() - n_sigma * vals.std(), NEG_INF)


def mirostat_v1(
    logits: torch.Tensor, tau: float, eta: float, mu: float, n_vocab: int,
    generator: torch.Generator | None = None, m: int = 100,
) -> tuple[int, float]:
    """Mirostat 1.0 (Basu et al.): estimate the Zipf exponent from the top ``m`` tokens, pick the
    top-k that targets surprise ``tau``, sample, and move ``mu``. Returns (position, new mu)."""
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    count = min(m, int((probs > 0).sum())) - 1
    if count < 1:
        return int(order[0]), mu
    i = torch.arange(count, dtype=torch.float64)
    t = torch.log((i + 2) / (i + 1))
    b = torch.log(probs[:count].double() / probs[1 : count + 1].double())
    s_hat = float((t * b).sum() / (t * t).sum())
    eps = s_hat - 1.0
    if abs(eps) < 1e-9:
        k = n_vocab
    else:
        k = int(((eps * 2.0 ** mu) / (1.0 - n_vocab ** (-eps))) ** (1.0 / s_hat)) if s_hat > 0 else n_vocab
    k = max(1, min(k, int((probs > 0).sum())))
    kept = probs[:k] / probs[:k].sum()
    j = int(torch.multinomial(kept, 1, generator=generator))
    surprise = -math.log2(float(kept[j]))
    return int(order[j]), mu - eta * (surprise - tau)


def mirostat_v2(
    logits: torch.Tensor, tau: float, eta: float, mu: float, generator: torch.Generator | None = None
) -> tuple[int, float]:
    """Mirostat 2.0: drop tokens whose surprise ``-log2 p`` exceeds ``mu``, sample, move ``mu``
    toward the target ``tau``. Returns (position, new mu)."""
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    surprise = -torch.log2(probs)
    keep_n = max(1, int((surprise <= mu).sum()))
    kept = probs[:keep_n] / probs[:keep_n].sum()
    j = int(torch.multinomial(kept, 1, generator=generator))
    observed = -math.log2(float(kept[j]))
    return int(order[j]), mu - eta * (observed - tau)
