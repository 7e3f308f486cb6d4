"""Ranks per tensor under a byte budget: where a rank buys the most.

Each singular value σ of a target's (scaled or whitened) residual is what one more rank of θ
removes from it: σ² of the residual's energy (with second-moment whitening, of the layer's output
error over the calibration inputs). A rank costs ``out + in`` int8 values and one float32 scale,
a target with any rank also its ``out`` row scales. Ranks are handed out greedily by the share of
the target's own residual energy they remove, per byte. (The absolute σ² was worse: the layers'
output energies differ by orders of magnitude, and Gemma 3 270M's perplexity went 16.82 → 17.47
at the bytes of rank 8 everywhere; the share gives 17.00, still short of uniform rank 8:
docs/theta-results.md.)
"""

from __future__ import annotations

import heapq

from .svd import SVDResult


def rank_bytes(shape: tuple[int, ...], rank: int) -> int:
    """Bytes θ of this rank adds to the file for a weight of ``shape`` ([out, in])."""
    if rank <= 0:
        return 0
    out, inp = shape
    return rank * (out + inp + 4) + 4 * out


def allocate(svds: dict[str, tuple[tuple[int, ...], SVDResult]], budget: int, max_rank: int) -> dict[str, int]:
    """Rank per target, their bytes summing to at most ``budget``; a target may get 0 (no θ)."""
    ranks = {name: 0 for name in svds}
    heap: list[tuple[float, str]] = []

    def push(name: str) -> None:
        shape, svd = svds[name]
        r = ranks[name]
        if r < min(max_rank, svd.s.numel()):
            gain = float(svd.s[r]) ** 2 / (svd.total_energy if svd.total_energy > 0 else 1.0)
            cost = rank_bytes(shape, r + 1) - rank_bytes(shape, r)
            heapq.heappush(heap, (-gain / cost, name))

    for name in svds:
        push(name)
    spent = 0
    while heap:
        _, name = heapq.heappop(heap)
        shape = svds[name][0]
        cost = rank_bytes(shape, ranks[name] + 1) - rank_bytes(shape, ranks[name])
        if spent + cost > budget:
            continue  # a cheaper target may still fit
        ranks[name] += 1
        spent += cost
        push(name)
    return ranks
