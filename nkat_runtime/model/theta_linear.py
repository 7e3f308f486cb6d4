"""The star-product linear: ``y = base(x) + 0.5·γ·U'(V'x)`` over any base linear (dense or packed).

On a dense base θ is folded into the weight. Over a packed base (the CPU kernels, the Triton
kernels) the θ term is computed from the input: ``z = x·V'ᵀ`` (:func:`project_right`), then one
GEMM that adds ``0.5·γ·z·U'ᵀ`` into the base's output (:func:`add_left`). Linears that read one
input (q/k/v, gate/up) share the first product: ``theta_fused.py``.

Both products take their factor as a batch of one matrix ([1, K, k] and [1, k, N], views kept
with the layer), so a decode step of one sequence makes no view of them: on a 2-core EPYC a
decode step runs a few hundred of these small products, and each tensor op costs about a µs.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..theta.factors import ThetaFactors
from .linear import RowLocal, aligned, is_decode, own_row


def project_right(x: torch.Tensor, right_t: torch.Tensor, row_local: bool) -> torch.Tensor:
    """``z = x·V'ᵀ`` for x [..., K] and ``right_t`` = V'ᵀ as [1, K, k] (several targets' V' stacked too).

    In a decode step that keeps rows apart (``row_local``, x [B, 1, K]) each row is a 1-row
    product of its own, one call per row ([B, 1, k]: the same call whatever B is, as
    :func:`.linear.row_local_matmul`); otherwise one GEMM ([M, k]). Computed in V''s dtype.
    """
    if x.dtype != right_t.dtype:
        x = x.to(right_t.dtype)
    if row_local and is_decode(x):
        if x.shape[0] == 1:
            return torch.bmm(own_row(x, 0), right_t)
        return torch.cat([torch.bmm(own_row(x, i), right_t) for i in range(x.shape[0])])
    return torch.mm(x.reshape(-1, x.shape[-1]), right_t[0])


def add_left(y: torch.Tensor, z: torch.Tensor, left_t: torch.Tensor, coef: float) -> torch.Tensor:
    """``y + coef·z·U'ᵀ`` in one GEMM that accumulates into the base output ``y`` [..., N] in place
    (every base linear returns a fresh tensor); ``z`` is :func:`project_right`'s result (or a slice
    of its columns), ``left_t`` = U'ᵀ as [1, k, N]."""
    if y.dtype != left_t.dtype:
        return add_left(y.to(left_t.dtype), z, left_t, coef).to(y.dtype)
    if z.dim() == 3:  # row-local decode, y [B, 1, N]: each row's own 1-row GEMM
        for i in range(z.shape[0]):
            yi = y[i : i + 1]
            if aligned(yi):
                yi.baddbmm_(own_row(z, i), left_t, alpha=coef)
            else:  # at the alignment the row has alone
                yi.copy_(own_row(y, i).baddbmm_(own_row(z, i), left_t, alpha=coef))
        return y
    rows = y.reshape(-1, y.shape[-1])
    return rows.addmm_(z, left_t[0], alpha=coef).view(y.shape)


class ThetaLinear(RowLocal, nn.Module):
    """``base(x) + 0.5·γ·U'(V'x)``; wraps any linear module (dense or packed).

    When the base holds a dense weight and ``restore`` can rebuild its exact source weight
    (the loader dequantises it again from the memory-mapped file), θ is folded into the
    weight: ``W' = W + 0.5·γ·U'V'``, so the star-product costs nothing per token. A change
    of γ re-folds from the exact source, and γ = 0 gives back W bit for bit. Other bases
    (packed weights) run the θ term from the input (module doc); γ = 0 skips it.

    The factors are kept dequantised in ``dtype`` (float32: on a 2-core EPYC, at these shapes, a
    bf16 batched GEMM measured 7-10x slower than float32 and torch's int8 weight-only GEMM
    4-6x slower; an fp16 copy would risk overflow in z): ``theta_right`` V' [k, in]
    (contiguous, or a view of the stack of a shared-input group) and ``theta_u_t`` U'ᵀ
    [1, k, out], with ``theta_v_t`` = V'ᵀ [1, in, k] a view of ``theta_right``.
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
        # packed bases hold their weight in buffers (a GGUFLinear's on the GPU), a bias at most as a parameter
        device = next(iter([*base.parameters(), *base.buffers()]), torch.empty(0)).device
        left_t = factors.left().t().contiguous().unsqueeze(0)
        self.register_buffer("theta_u_t", left_t.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("theta_right", factors.right().to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("theta_v_t", self.theta_right.t().unsqueeze(0), persistent=False)
        self.restore = restore
        weight = getattr(base, "weight", None)
        self.folded = restore is not None and isinstance(weight, torch.Tensor) and weight.dim() == 2
        self.gamma = 0.0
        self.set_gamma(gamma)

    def share_right(self, rows: torch.Tensor) -> None:
        """Use ``rows`` (equal to V', e.g. a view of a group's stack) as this layer's right factor."""
        self.theta_right = rows
        self.theta_v_t = rows.t().unsqueeze(0)

    @property
    def theta_left(self) -> torch.Tensor:
        """U' [out, k] (a view of ``theta_u_t``)."""
        return self.theta_u_t[0].t()

    @property
    def rank(self) -> int:
        return int(self.theta_right.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.theta_right.shape[1])

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
        return add_left(y, project_right(x, self.theta_v_t, self.row_local), self.theta_u_t, 0.5 * self.gamma)


def theta_layers(model: nn.Module) -> list[ThetaLinear]:
    return [m for m in model.modules() if isinstance(m, ThetaLinear)]


def set_theta_gamma(model: nn.Module, gamma: float) -> int:
    """Set γ on every θ layer (0 turns θ off); returns how many layers carry θ."""
    layers = theta_layers(model)
    for layer in layers:
        layer.set_gamma(gamma)
    return len(layers)
