"""Linear layers the model is built from.

``DenseLinear`` holds a weight dequantised once at load to float32: every weight on the
reference path, the types that do not pack on the fast path (``packed.py``). Packed forms
and the θ star-product wrap or replace it without the model code knowing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DenseLinear(nn.Module):
    """``y = x·Wᵀ (+ b)`` with W [out, in] held dense."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Computed in the weight's dtype, returned in ``x``'s."""
        w = self.weight
        if w.dtype == x.dtype:
            return F.linear(x, w, self.bias)
        y = F.linear(x.to(w.dtype), w)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype)
