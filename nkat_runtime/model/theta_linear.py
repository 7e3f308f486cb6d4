"""The star-product linear: ``y = base(x) + 0.5·γ·U'(V'x)`` over any base linear (dense or packed)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..theta.factors import ThetaFactors
from .linear import RowLocal, is_decode, row_local_matmul


class ThetaLinear(RowLocal, nn.Module):
    """``base(x) + 0.5·γ·U'(V'x)``; wraps any linear module (dense or packed).

    When the base holds a dense weight and ``restore`` can rebuild its exact source weight
    (the loader dequantises it again from the memory-mapped file), θ is folded into the
    weight: ``W' = W + 0.5·γ·U'V'``, so the star-product costs nothing per token. A change
    of γ re-folds from the exact source, and γ = 0 gives back W bit for bit. Other bases
    (packed weights) run the θ term as two small extra matmuls.
    """

    def __init__(
        self,
        base: nn.Module,
        factors: ThetaFactors,
        gamma: float,
        dtype: torch.dtype = torch.float32,
        restore: Callable[[], torch.Tensor] | None = None,
    ):
        super().__init__()
        self.base = base
        device = next(base.parameters(), torch.empty(0)).device
        self.register_buffer("theta_left", factors.left().to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("theta_right", factors.right().to(device=device, dtype=dtype), persistent=False)
        self.restore = restore
        weight = getattr(base, "weight", None)
        self.folded = restore is not None and isinstance(weight, torch.Tensor) and weight.dim() == 2
        self.gamma = 0.0
        self.set_gamma(gamma)

    @property
    def rank(self) -> int:
        return int(self.theta_left.shape[1])

    def source_weight(self) -> torch.Tensor:
        """The weight without θ, float32 (dequantised again from the file when possible)."""
        if self.restore is not None:
            return self.restore()
        return self.base.weight

    @torch.no_grad()
    def set_gamma(self, gamma: float) -> None:
        gamma = float(gamma)
        if self.folded and gamma != self.gamma:
            w = self.base.weight
            exact = self.restore().to(device=w.device)  # type: ignore[misc]
            if gamma != 0.0:
                exact = exact.float() + (0.5 * gamma) * (self.theta_left.float() @ self.theta_right.float())
            w.copy_(exact.to(w.dtype))
        self.gamma = gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.folded or self.gamma == 0.0:
            return y
        xt = x.to(self.theta_right.dtype)
        if self.row_local and is_decode(x):
            z = row_local_matmul(row_local_matmul(xt.reshape(-1, x.shape[-1]), self.theta_right), self.theta_left)
            z = z.view(*x.shape[:-1], -1)
        else:
            z = F.linear(F.linear(xt, self.theta_right), self.theta_left)
        return y + (0.5 * self.gamma) * z.to(y.dtype)


def theta_layers(model: nn.Module) -> list[ThetaLinear]:
    return [m for m in model.modules() if isinstance(m, ThetaLinear)]


def set_theta_gamma(model: nn.Module, gamma: float) -> int:
    """Set γ on every θ layer (0 turns θ off); returns how many layers carry θ."""
    layers = theta_layers(model)
    for layer in layers:
        layer.set_gamma(gamma)
    return len(layers)
