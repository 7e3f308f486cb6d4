"""Linear layers the model is built from.

``DenseLinear`` holds a weight dequantised once at load to float32: every weight on the
reference path, the types that do not pack on the fast path (``packed.py``). Packed forms
and the θ star-product wrap or replace it without the model code knowing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BLOCK_ROWS = 8  # decode-sized inputs are multiplied in blocks of 2 .. 8 rows


def batch_invariant_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x·Wᵀ`` for a few rows, each row's bits independent of how many rows come along.

    Measured here (MKL sgemm, CPU): blocks of 2 to 8 rows give every row the same bits, one
    row alone (a gemv) does not, 16 rows do not. So a decode step of one sequence computes what
    the same sequence computes inside a batch of eight: a single row is padded to two, more
    rows go in blocks of at most eight.
    """
    if x.shape[0] == 1:
        return F.linear(x.expand(2, -1), w)[:1]
    parts = [x[i : i + BLOCK_ROWS] for i in range(0, x.shape[0], BLOCK_ROWS)]
    return torch.cat([batch_invariant_linear(p, w) if p.shape[0] == 1 else F.linear(p, w) for p in parts])


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
        if x.numel() < 16 * x.shape[-1]:  # decode: see batch_invariant_linear
            y = batch_invariant_linear(x.reshape(-1, x.shape[-1]).to(w.dtype), w).view(*x.shape[:-1], -1)
        elif w.dtype == x.dtype:
            return F.linear(x, w, self.bias)
        else:
            y = F.linear(x.to(w.dtype), w)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype)
