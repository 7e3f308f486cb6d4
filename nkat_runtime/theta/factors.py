"""θ: the low-rank correction factors a .nkat file stores (the linear that applies them is
:mod:`nkat_runtime.model.theta_linear`).

For a target weight W (out × in) a ``.nkat`` file stores θ = diag(su)·U · diag(sv)·V with
U int8 [out, k] and V int8 [k, in] (symmetric per-row scales). The forward pass is

    y = W·x + 0.5·γ·U'·(V'·x)

with U', V' the dequantised factors. They are tiny (k·(out+in) values), so they are kept
dequantised in the compute dtype: the cheapest form to multiply. On a dense weight θ is
folded in (no cost per token); γ = 0 always gives exactly the base layer's output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

THETA_SUFFIXES = ("theta_u", "theta_u_scale", "theta_v", "theta_v_scale")


def theta_tensor_names(target: str) -> tuple[str, str, str, str]:
    """GGUF names of the four θ tensors of ``target`` (e.g. ``blk.0.ffn_gate.weight``)."""
    return tuple(f"{target}.{s}" for s in THETA_SUFFIXES)  # type: ignore[return-value]


def quantize_rows_int8(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``m ≈ q * scale[:, None]``, q in [-127, 127]."""
    m = m.float()
    scale = m.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(m / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


@dataclass
class ThetaFactors:
    u: torch.Tensor  # int8 [out, k]
    u_scale: torch.Tensor  # float32 [out]
    v: torch.Tensor  # int8 [k, in]
    v_scale: torch.Tensor  # float32 [k]

    @classmethod
    def from_dense(cls, left: torch.Tensor, right: torch.Tensor) -> "ThetaFactors":
        """Quantise θ = left·right (left [out, k], right [k, in]) to int8 factors."""
        u, su = quantize_rows_int8(left)
        v, sv = quantize_rows_int8(right)
        return cls(u, su, v, sv)

    @property
    def rank(self) -> int:
        return int(self.u.shape[1])

    def left(self) -> torch.Tensor:
        return self.u.float() * self.u_scale[:, None]

    def right(self) -> torch.Tensor:
        return self.v.float() * self.v_scale[:, None]

    def matrix(self) -> torch.Tensor:
        """The dense θ (out × in), for tests and experiments."""
        return self.left() @ self.right()

    def validate(self, out_features: int, in_features: int, name: str) -> None:
        from ..errors import ModelFormatError

        k = self.u.shape[1] if self.u.dim() == 2 else -1
        ok = (
            self.u.dim() == 2 and self.v.dim() == 2 and self.u.shape == (out_features, k)
            and self.v.shape == (k, in_features) and self.u_scale.shape == (out_features,)
            and self.v_scale.shape == (k,) and bool(torch.isfinite(self.u_scale).all())
            and bool(torch.isfinite(self.v_scale).all())
        )
        if not ok:
            raise ModelFormatError(
                f"θ factors of {name} do not fit the {out_features}×{in_features} weight: "
                f"u {tuple(self.u.shape)}, v {tuple(self.v.shape)}, "
                f"scales {tuple(self.u_scale.shape)}/{tuple(self.v_scale.shape)}"
            )
