"""How θ is made from weights: truncated SVD in the two modes of the .nkat spec.

- ``moyal`` (the guide's recipe): θ = the rank-r part of W itself; for a square W it is
  antisymmetrised, θ ← (θ − θᵀ)/2, which doubles the stored rank.
- ``residual``: θ = the rank-r part of 2·(W_ref − W_q), so that γ = 1 adds back the best
  rank-r share of what quantisation lost; with per-input-channel activation scales
  (mean |x| on a calibration text) the SVD is taken of the scaled residual and unscaled
  after (LQER's activation-aware variant); with the inputs' second-moment matrix R = L·Lᵀ it is
  taken of ΔW·L and multiplied by L⁻¹ after, which minimises the output error over the
  calibration inputs (QERA; :mod:`.calibrate`).

Each function returns ``(left [out, k], right [k, in])`` with θ = left·right, the singular
values split evenly between the two so both factors quantise well to int8.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import torch

if TYPE_CHECKING:
    from .calibrate import Whitening

Scale = Union[torch.Tensor, "Whitening"]  # a per-channel scale, or a whitening

DEFAULT_TARGET_SIZE = 1024


@dataclass
class SVDResult:
    u: torch.Tensor  # [out, q]
    s: torch.Tensor  # [q]
    vh: torch.Tensor  # [q, in]
    total_energy: float  # ||M||_F², for the share a rank captures

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        r = min(rank, self.s.numel())
        root = self.s[:r].sqrt()
        return self.u[:, :r] * root, root[:, None] * self.vh[:r]

    def energy_share(self, rank: int) -> float:
        """Fraction of ||M||_F² the rank-``rank`` truncation captures."""
        if self.total_energy <= 0:
            return 1.0
        return float((self.s[:rank] ** 2).sum()) / self.total_energy


def truncated_svd(m: torch.Tensor, rank: int, target_size: int = DEFAULT_TARGET_SIZE, seed: int = 0) -> SVDResult:
    """Top-``rank`` singular triplets of ``m`` (float32/64). A full SVD when the smaller
    side is at most ``target_size``, else a randomised one (Halko et al.) with a sketch of
    at most ``target_size`` columns, so the working size stays bounded."""
    m = m.float()
    total = float((m.double() ** 2).sum())
    small = min(m.shape)
    if small <= target_size:
        u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
        r = min(rank, small)
        return SVDResult(u[:, :r].float(), s[:r].float(), vh[:r].float(), total)
    q = min(small, max(rank + 16, 2 * rank), max(target_size, rank))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(m, q=q, niter=6)
    r = min(rank, q)
    return SVDResult(u[:, :r].contiguous(), s[:r].contiguous(), v[:, :r].T.contiguous(), total)


def moyal_factors(w: torch.Tensor, svd: SVDResult, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The guide's θ: rank-r part of W, antisymmetrised when W is square (k = 2r)."""
    a, b = svd.factors(rank)  # θ = a·b
    if w.shape[0] != w.shape[1]:
        return a, b
    # (θ − θᵀ)/2 = ½(a·b − bᵀ·aᵀ) = [½a, ½bᵀ] · [b; −aᵀ]
    left = torch.cat((0.5 * a, 0.5 * b.T), dim=1)
    right = torch.cat((b, -a.T), dim=0)
    return left, right


def residual_matrix(w_q: torch.Tensor, w_ref: torch.Tensor, act_scale: "Scale | None" = None) -> torch.Tensor:
    """2·(W_ref − W_q), its columns scaled by the activation scale (a vector) or whitened by
    a square root of R (a :class:`~nkat_runtime.theta.calibrate.Whitening`) when given."""
    e = 2.0 * (w_ref.float() - w_q.float())
    if isinstance(act_scale, torch.Tensor):
        e = e * act_scale.float()[None, :]
    elif act_scale is not None:
        e = act_scale.whiten(e)
    return e


def unscaled(svd: SVDResult, act_scale: "Scale | None") -> SVDResult:
    """The SVD of a scaled or whitened residual with its right vectors taken back through the
    scaling (÷ scale) or whitening (·L⁻¹), so that its :meth:`~SVDResult.factors` are θ's at any
    rank (the map is linear in the rows) and the scale need not be kept."""
    if act_scale is None:
        return svd
    if isinstance(act_scale, torch.Tensor):
        vh = svd.vh / act_scale.float()[None, :]
    else:
        vh = act_scale.unwhiten(svd.vh)
    return SVDResult(svd.u, svd.s, vh, svd.total_energy)


def residual_factors(svd: SVDResult, rank: int, act_scale: "Scale | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of the residual's rank-r part (undoing the activation scaling or whitening)."""
    return unscaled(svd, act_scale).factors(rank)


def activation_scale(mean_abs: torch.Tensor, floor_ratio: float = 1e-3) -> torch.Tensor:
    """Per-input-channel scale from mean |x|, floored so no column is divided by ~0."""
    s = mean_abs.float().clamp_min(0)
    floor = max(float(s.max()) * floor_ratio, 1e-8)
    return s.clamp_min(floor)
