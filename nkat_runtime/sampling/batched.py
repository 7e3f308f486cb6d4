"""Sampling for a whole decode batch where its logits are (the GPU, or the CPU): one pass over
[B, V], one transfer of the chosen ids.

It runs the common chain — logit bias and bans → repetition / presence / frequency penalties →
top-k → top-p → min-p → temperature → draw (greedy: the argmax) — with each row's own settings
as tensors, so a step costs no host round trip per row and nothing in it syncs until the ids
are read. A row whose settings use anything else (DRY, mirostat, XTC, top-a, TFS, typical,
top-n-σ, dynamic temperature, smoothing, another sampler order) or whose step needs the host
(a grammar, a token banned at one position after a banned phrase) is left to
:func:`.chain.sample`; :func:`batchable` says which.

The draw is an exponential race (``argmax(p / E)``, E ~ Exp(1), as vLLM draws), with each row's
own generator, so a seeded row picks the same token whatever else is in the batch. It is a
different draw from :func:`torch.multinomial`: a seed gives other text here than on the host
path, the same text on every run. Top-k keeps exactly ``k`` candidates where the host keeps
ties with the k-th too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .chain import PREFILTER
from .extra import BAN_BIAS
from .params import DEFAULT_ORDER, REP_PEN, TEMPERATURE, TOP_K, TOP_P, SamplingParams

NEG_INF = float("-inf")
PAIRWISE_WINDOW = 256  # penalty windows up to this long count by pairwise comparison, longer ones by a scatter


@dataclass
class Row:
    """One sequence's part in a batch: its settings, its tokens so far (prompt and output; the
    penalties' window is taken from its end) and its generator (on the logits' device)."""

    params: SamplingParams
    history: Sequence[int]
    generator: torch.Generator | None = None


def batchable(p: SamplingParams) -> bool:
    """Whether this module samples ``p`` exactly as :func:`.chain.sample` does (up to the draw)."""
    if (p.mirostat or p.dry_multiplier > 0 or p.xtc_probability > 0 or p.top_a > 0 or p.typical < 1.0
            or p.tfs < 1.0 or p.top_n_sigma > 0 or p.dynatemp_range > 0 or p.smoothing_factor > 0):
        return False
    order = tuple(p.sampler_order or DEFAULT_ORDER)
    used = [s for s in order if s in (REP_PEN, TOP_K, TOP_P, TEMPERATURE)]
    penalizing = p.repeat_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
    needed = [s for s, on in ((REP_PEN, penalizing), (TOP_K, p.top_k > 0), (TOP_P, p.top_p < 1.0 or p.min_p > 0),
                              (TEMPERATURE, not p.greedy_mode)) if on]
    # the active steps must all be listed and in the default order; penalties must come first in
    # the order itself (after any other step the host applies them to the top-5000 prefilter only)
    if penalizing and order[0] != REP_PEN:
        return False
    return all(s in used for s in needed) and [s for s in used if s in needed] == needed


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).to(device, non_blocking=True)[:, None]


def _bias_and_bans(x: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
    r, ids, add, ban = [], [], [], []
    V = x.shape[1]
    for b, row in enumerate(rows):
        for tok, bias in row.params.logit_bias.items():
            if 0 <= tok < V:
                r.append(b), ids.append(tok), add.append(0.0 if bias <= BAN_BIAS else bias), ban.append(bias <= BAN_BIAS)
        for tok in row.params.banned_ids:
            if 0 <= tok < V:
                r.append(b), ids.append(tok), add.append(0.0), ban.append(True)
    if not r:
        return x
    dev = x.device
    ri, ti = torch.tensor(r).to(dev), torch.tensor(ids).to(dev)
    x = x.clone()
    x.index_put_((ri, ti), torch.tensor(add).to(dev), accumulate=True)
    banned = torch.tensor(ban).to(dev)
    # only the bans are written now: every repeat of an index writes the same -inf (a repeated
    # index with different values would leave the result to the device)
    return x.index_put_((ri[banned], ti[banned]), torch.tensor(NEG_INF, device=dev))


def _penalties(x: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
    """KoboldCpp's two-tier repetition penalty and OpenAI's presence/frequency penalties over
    each row's last ``repeat_last_n`` tokens (as :func:`.extra.apply_penalties`), computed at the
    window's ids only: each window position learns its id's count and tier from the others."""
    V = x.shape[1]
    windows = []
    for row in rows:
        p, h = row.params, row.history
        on = p.repeat_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
        w = [] if not on or p.repeat_last_n == 0 else list(h) if p.repeat_last_n < 0 else list(h[-p.repeat_last_n :])
        windows.append([t for t in w if 0 <= t < V])
    width = max(len(w) for w in windows)
    if width == 0:
        return x
    dev = x.device
    # padding repeats a row's first id (or id 0 in an empty window): it reads and writes back that
    # id's own result, and is left out of the counts
    ids = torch.tensor([w + [w[0] if w else 0] * (width - len(w)) for w in windows]).to(dev)
    n = torch.tensor([len(w) for w in windows]).to(dev)[:, None]
    j = torch.arange(width, device=dev)[None, :]
    valid = j < n
    recent = valid & (j >= n // 2)  # the recent half: positions from len // 2 on, as the host splits
    if width <= PAIRWISE_WINDOW:  # each position compares its id with the others: [B, W, W]
        same = ids[:, :, None] == ids[:, None, :]
        counts = (same & valid[:, None, :]).sum(-1).float()
        near = (same & recent[:, None, :]).any(-1)
    else:  # long windows: counts through the vocabulary, [B, V]
        B = x.shape[0]
        counts = torch.zeros(B, V, device=dev).scatter_add_(1, ids, valid.float()).gather(1, ids)
        near = torch.zeros(B, V, device=dev).scatter_add_(1, ids, recent.float()).gather(1, ids) > 0
    seen = counts > 0
    pen = _column([r.params.repeat_penalty for r in rows], dev)
    slope = _column([r.params.repeat_slope for r in rows], dev)
    reduced = torch.where(pen > 1.0, 1.0 + (pen - 1.0) * slope, pen)
    factor = torch.where(near, pen, torch.where(seen, reduced, torch.ones_like(pen)))
    vals = x.gather(1, ids)
    vals = torch.where(vals <= 0, vals * factor, vals / factor)
    presence = _column([r.params.presence_penalty for r in rows], dev)
    frequency = _column([r.params.frequency_penalty for r in rows], dev)
    vals = vals - seen.float() * presence - counts * frequency
    return x.scatter(1, ids, torch.where(seen, vals, x.gather(1, ids)))


def _filtered(logits: torch.Tensor, rows: Sequence[Row]) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw logits as float32, and after bias, bans and penalties; plus the greedy choice."""
    raw = logits.detach().float()
    x = _penalties(_bias_and_bans(raw, rows), rows)
    best = x.argmax(dim=1)
    if any(r.params.logit_bias or r.params.banned_ids for r in rows):  # a row may have nothing left
        best = torch.where(x.gather(1, best[:, None])[:, 0] > NEG_INF, best, raw.argmax(dim=1))
    return x, best


def _chain(x: torch.Tensor, rows: Sequence[Row]) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k → top-p → min-p → temperature on filtered logits [B, V]: candidates [B, K], ids [B, K]."""
    V, dev = x.shape[1], x.device
    ks = [r.params.top_k if 0 < r.params.top_k < V else V for r in rows]
    K = min(V, PREFILTER, max(ks))
    vals, ids = torch.topk(x, K, dim=1)  # sorted, most likely first
    j = torch.arange(K, device=dev)[None, :]
    if min(ks) < K:
        vals = vals.masked_fill(j >= torch.tensor(ks).to(dev)[:, None], NEG_INF)  # top-k
    if any(r.params.top_p < 1.0 for r in rows):
        probs = torch.softmax(vals, dim=1)
        top_p = _column([r.params.top_p for r in rows], dev)
        drop = (torch.cumsum(probs, dim=1) - probs >= top_p) & (j > 0) & (top_p < 1.0)  # the first always stays
        vals = vals.masked_fill(drop, NEG_INF)
    if any(r.params.min_p > 0 for r in rows):
        probs = torch.softmax(vals, dim=1)
        min_p = _column([r.params.min_p for r in rows], dev)
        vals = vals.masked_fill((probs < min_p * probs[:, :1]) & (min_p > 0), NEG_INF)
    temp = _column([r.params.temperature if r.params.temperature > 0 else 1.0 for r in rows], dev)
    return vals / temp, ids


def candidates(logits: torch.Tensor, rows: Sequence[Row]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chain on logits [B, V] up to the draw: the candidates' final logits [B, K] (-inf:
    removed; temperature applied), their token ids [B, K], and the greedy choice [B] (the
    argmax after bias, bans and penalties; the raw argmax for a row with everything banned)."""
    x, best = _filtered(logits, rows)
    return *_chain(x, rows), best


def _draw(vals: torch.Tensor, ids: torch.Tensor, best: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
    probs = torch.softmax(vals, dim=1)
    race = torch.ones_like(probs)
    K = vals.shape[1]  # at least min(vocabulary, PREFILTER, each row's top-k)
    for b, row in enumerate(rows):  # each row draws as many values as its own top-k keeps, so a
        k = min(row.params.top_k, K) if row.params.top_k > 0 else K  # seed's stream ignores the batch
        race[b, :k].exponential_(generator=row.generator)
    j = (probs / race.clamp_(min=torch.finfo(torch.float32).tiny)).argmax(dim=1)
    # a temperature near float max or a tiny penalty overflows the chain: the best finite candidate
    bad = ~torch.isfinite(probs).all(dim=1) | (probs.sum(dim=1) <= 0)
    j = torch.where(bad, vals.nan_to_num(nan=NEG_INF, posinf=float("inf")).argmax(dim=1), j)
    drawn = ids.gather(1, j[:, None])[:, 0]
    banned = vals.max(dim=1).values == NEG_INF  # nothing left: the raw argmax, as the host does
    return torch.where(banned, best, drawn)


def sample_batch(logits: torch.Tensor, rows: Sequence[Row]) -> list[int]:
    """The next token of each row of logits [B, V], chosen on their device; one transfer. Greedy
    rows take the argmax; only the others run the chain and the draw."""
    x, best = _filtered(logits, rows)
    drawn = [b for b, r in enumerate(rows) if not r.params.greedy_mode]
    if not drawn:
        return best.tolist()
    if len(drawn) == len(rows):
        return _draw(*_chain(x, rows), best, rows).tolist()
    sub = [rows[b] for b in drawn]
    at = torch.tensor(drawn).to(x.device)
    return best.index_copy(0, at, _draw(*_chain(x[at], sub), best[at], sub)).tolist()
