"""Activation statistics of a calibration text, for activation-aware residual θ.

Two kinds, per target weight (its input channels):

* ``mean-abs``: mean |x| per channel, the diagonal scale of LQER-style θ.
* ``second-moment``: R = E[x·xᵀ], whose square root whitens the residual so its truncated SVD
  minimises the layer's *output* error over the calibration inputs (QERA, arXiv 2410.06040):
  θ = SVD_r(ΔW·R^{1/2})·R^{-1/2}, here with R's Cholesky factor in place of R^{1/2} (the same θ).
  Weights that read the same input (q/k/v; gate/up) share one R.

R is d_in² floats per input: 8960² · 4 B = 321 MB for a 1.5B model's ``ffn_down``. The forward
passes are repeated over groups of layers, each group's statistics handed on and dropped before
the next, so at most ``budget_bytes`` of R are held at once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

log = logging.getLogger(__name__)

STATS = ("mean-abs", "second-moment")
DEFAULT_STAT = "second-moment"  # as good as mean-abs on Gemma 3 270M, far better on Qwen2.5-Coder (docs §2f)
DEFAULT_CHUNKS = 4
SHARED_INPUT = {"attn_q": "attn_in", "attn_k": "attn_in", "attn_v": "attn_in", "ffn_gate": "ffn_in", "ffn_up": "ffn_in"}
DEFAULT_BUDGET = 2 * 2**30


def input_key(name: str) -> str:
    """The name of the input a target reads (``blk.3.attn_k.weight`` → ``blk.3.attn_in``)."""
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk":
        return f"blk.{parts[1]}.{SHARED_INPUT.get(parts[2], parts[2])}"
    return name


@dataclass
class Whitening:
    """The lower Cholesky factor L of a regularised second-moment matrix, R + λ·I = L·Lᵀ (float64).

    ||(ΔW − θ)·L||_F² = tr((ΔW − θ)·R·(ΔW − θ)ᵀ) is the output error over the calibration
    inputs, so θ = SVD_r(ΔW·L)·L⁻¹ minimises it at rank r. Any square root of R gives the same θ
    and the same singular values (QERA writes the symmetric R^{1/2}); the Cholesky factor costs
    d³/3 flops and no eigendecomposition: 3 s rather than minutes for d = 8960 on 2 cores."""

    chol: torch.Tensor

    def whiten(self, m: torch.Tensor) -> torch.Tensor:
        """M·L (float32)."""
        return m.float() @ self.chol.float()

    def unwhiten(self, m: torch.Tensor) -> torch.Tensor:
        """M·L⁻¹ (float32), by a triangular solve in float64."""
        return torch.linalg.solve_triangular(self.chol.T, m.double().T, upper=True).T.float()


def whitening(r: torch.Tensor, damp: float = 0.01) -> Whitening:
    """The Cholesky factor of R + damp·mean(diag R)·I (R is positive semi-definite up to rounding;
    the damping, a share of the mean eigenvalue, keeps L⁻¹ bounded where a channel is (nearly)
    never used)."""
    r64 = r.double()
    r64 = 0.5 * (r64 + r64.T)
    eps = max(float(r64.diagonal().mean()) * damp, 1e-12)
    r64.diagonal().add_(eps)
    return Whitening(torch.linalg.cholesky(r64))


def calibration_batches(tokenizer, text: str, chunks: int, ctx: int) -> list[list[int]]:
    """The first ``chunks`` chunks of ``ctx`` tokens of ``text`` (at least one, shorter when the
    text is)."""
    ids = tokenizer.encode(text, add_special=True)
    n = max(1, min(chunks, len(ids) // ctx))
    return [ids[i * ctx : (i + 1) * ctx] for i in range(n)]


@dataclass
class Calibration:
    """What activation-aware θ is calibrated on: ``chunks`` chunks of ``ctx`` tokens of ``text``."""

    text: str
    chunks: int = DEFAULT_CHUNKS
    kind: str = DEFAULT_STAT
    ctx: int = 512
    budget_bytes: int = DEFAULT_BUDGET


def calibration_groups(path: Path, targets: list[str], cal: Calibration,
                       progress: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Per target: mean |x| (``[d_in]``) or E[x·xᵀ] (``[d_in, d_in]``), yielded a group of
    targets at a time (one forward pass over the calibration chunks per group, so at most
    ``cal.budget_bytes`` of statistics are held while the caller uses them); targets that share
    an input share the tensor object."""
    from ..loader import load_model

    if cal.kind not in STATS:
        raise ValueError(f"unknown activation statistic {cal.kind!r} ({' or '.join(STATS)})")
    lm = load_model(path, device="cpu", context=cal.ctx, progress=False, theta=False)
    modules = lm.model.linear_modules()
    keys: dict[str, list[str]] = {}
    for t in targets:
        if t in modules:
            keys.setdefault(input_key(t), []).append(t)
    batches = calibration_batches(lm.tokenizer, cal.text, cal.chunks, cal.ctx)
    passes = _passes(keys, modules, cal.kind, cal.budget_bytes)
    for i, group in enumerate(tqdm(passes, desc="calibration", unit="pass", disable=not progress or len(passes) == 1)):
        sums = _pass_sums(lm.model, modules, {key: keys[key][0] for key in group}, batches, cal.kind)
        if i == len(passes) - 1:
            del lm, modules  # the caller's SVDs of the last group run without the model in memory
        out: dict[str, torch.Tensor] = {}
        for key in list(sums):
            total, count = sums.pop(key)  # an inference tensor: divided into a new one, the sum dropped
            mean = total / count
            out.update(dict.fromkeys(keys[key], mean))  # one tensor for the targets that share the input
            del total, mean
        yield out
        del out  # before the next pass: else two groups' statistics are held at once


class _Stop(Exception):
    """Raised after the last block a pass needs, so the blocks after it and the head are skipped."""


def _pass_sums(model, modules: dict, firsts: dict[str, str], batches: list[list[int]],
               kind: str) -> dict[str, tuple[torch.Tensor, int]]:
    """One forward pass over ``batches``: per input key, the sum of |x| or of x·xᵀ and the row count
    (one hook per shared input, on its first target); the pass ends after the last block it reads."""
    sums: dict[str, tuple[torch.Tensor, int]] = {}

    def hook(key: str):
        def record(_mod, inputs, _out) -> None:
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            stat = x.abs().sum(0) if kind == "mean-abs" else x.T @ x
            if key in sums:
                total, count = sums[key]
                sums[key] = (total.add_(stat), count + x.shape[0])
            else:
                sums[key] = (stat, x.shape[0])
        return record

    def stop(*_args) -> None:
        raise _Stop

    hooks = [modules[first].register_forward_hook(hook(key)) for key, first in firsts.items()]
    blocks = [k.split(".") for k in firsts]
    if blocks and all(len(b) == 3 and b[0] == "blk" and b[1].isdigit() for b in blocks):
        hooks.append(model.layers[max(int(b[1]) for b in blocks)].register_forward_hook(stop))
    try:
        with torch.inference_mode():
            for chunk in batches:
                try:
                    model(torch.tensor([chunk]), torch.arange(len(chunk)), last_only=True)
                except _Stop:
                    pass
    finally:
        for h in hooks:
            h.remove()
    return sums


def _passes(keys: dict[str, list[str]], modules: dict, kind: str, budget: int) -> list[list[str]]:
    """The shared inputs split into groups whose statistics fit in ``budget`` bytes."""
    if kind == "mean-abs":
        return [list(keys)]
    groups: list[list[str]] = [[]]
    held = 0
    for key, names in keys.items():
        d = _in_features(modules[names[0]])
        need = 4 * d * d
        if groups[-1] and held + need > budget:
            groups.append([])
            held = 0
        groups[-1].append(key)
        held += need
    log.info("second-moment calibration: %d input(s) in %d pass(es)", len(keys), len(groups))
    return groups


def _in_features(mod: torch.nn.Module) -> int:
    """A block linear's input width: the packed and fused kernels say it, a dense one has its weight."""
    width = getattr(mod, "in_features", None)
    return width if isinstance(width, int) else int(mod.weight.shape[-1])
