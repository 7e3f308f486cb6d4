"""θ of linears that read one input, in one pass: q/k/v (the attention's normed input), gate/up.

For targets i = 1..n over the same x, ``SharedTheta`` computes ``z = x·[V'_1; …; V'_n]ᵀ`` once
(one product over the stacked right factors: the input is read once, not n times), then adds
``0.5·γ_i·z_i·U'_iᵀ`` into each base output with one GEMM per target (the base output is the
GEMM's accumulator: no separate scale and add). The stack is the only copy of the right factors:
each target's ``theta_right`` is a view of its rows, so a target run alone computes the same.

Each target's γ is read at every call (``ThetaLinear.set_gamma`` stays the one way to change
it); a target at γ = 0 gets exactly its base output. In a decode step both products are
row-local (``theta_linear.project_right``): a row's bits do not depend on the batch. Folded
targets (dense weights) and linears without θ run as they are. The parent module
(``Attention``, ``FeedForward``) builds its group when it is made and again when one of its linears
is replaced (``DecoderModel.replace_linear``); a group whose linears are no longer the parent's
is not used.
"""

from __future__ import annotations

import operator
from typing import Sequence

import torch
from torch import nn

from .linear import RowLocal
from .theta_linear import ThetaLinear, add_left, project_right


class SharedTheta(RowLocal, nn.Module):
    """The θ terms of ``layers`` (linears reading one input) from one stacked right product."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.layers = tuple(layers)  # not submodules: the parent owns them
        thetas = [i for i, m in enumerate(self.layers) if _unfolded(m)]
        stacked = torch.cat([self.layers[i].theta_right for i in thetas])  # [Σk, K]
        self.register_buffer("right_t", stacked.t().unsqueeze(0), persistent=False)  # [1, K, Σk], as read
        start = 0
        for i in thetas:
            layer = self.layers[i]
            layer.share_right(stacked[start : start + layer.rank])  # a view: the stack holds the only copy
            start += layer.rank
        self.theta = tuple(thetas)  # indices in layers of the targets whose θ is stacked, in order
        self.ranks = tuple(self.layers[i].rank for i in thetas)
        self.all_theta = len(thetas) == len(self.layers)
        self.equal_ranks = len(set(self.ranks)) == 1  # chunk() then: the cheapest way to cut z (~1 µs less)
        self.enabled = True  # set_theta_fusion: off runs each target on its own (tests, benchmarks)

    @classmethod
    def of(cls, layers: Sequence[nn.Module]) -> "SharedTheta | None":
        """The group of ``layers``, or None when fewer than two carry θ they run from the input."""
        thetas = [m for m in layers if _unfolded(m)]
        if len(thetas) < 2:
            return None
        first = thetas[0].theta_right
        if any(m.theta_right.dtype != first.dtype or m.theta_right.device != first.device
               or m.in_features != first.shape[1] for m in thetas):
            return None
        return cls(layers)

    def extra_repr(self) -> str:
        return f"{len(self.theta)} of {len(self.layers)} linears, ranks {'+'.join(map(str, self.ranks))} stacked"

    def serves(self, layers: tuple[nn.Module, ...]) -> bool:
        """Whether this group stands for ``layers`` (the parent's linears now) and is on."""
        return self.enabled and len(layers) == len(self.layers) and all(map(operator.is_, layers, self.layers))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        layers, theta = self.layers, self.theta
        if self.all_theta:
            outs = [layer.base(x) for layer in layers]
        else:
            outs = [layer.base(x) if i in theta else layer(x) for i, layer in enumerate(layers)]
        coefs = [0.5 * layers[i].gamma for i in theta]
        if not any(coefs):
            return outs
        z = project_right(x, self.right_t, self.row_local)
        zs = z.chunk(len(theta), dim=-1) if self.equal_ranks else z.split(self.ranks, dim=-1)
        for i, zi, coef in zip(theta, zs, coefs):
            if coef:
                outs[i] = add_left(outs[i], zi, layers[i].theta_u_t, coef)
        return outs


def _unfolded(layer: nn.Module) -> bool:
    return isinstance(layer, ThetaLinear) and not layer.folded


def project(layers: tuple[nn.Module, ...], group: SharedTheta | None, x: torch.Tensor) -> list[torch.Tensor]:
    """Each of ``layers`` applied to ``x``: through ``group`` when it stands for them, else one by one."""
    if group is not None and group.serves(layers):
        return group(x)
    return [layer(x) for layer in layers]


def set_theta_fusion(model: nn.Module, on: bool) -> int:
    """Shared-input θ on (default) or off (each target its own two products); returns the groups."""
    groups = [m for m in model.modules() if isinstance(m, SharedTheta)]
    for g in groups:
        g.enabled = on
    return len(groups)
