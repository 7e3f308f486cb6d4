"""Activation statistics of a calibration text, for activation-aware residual θ.

Two kinds, per target weight (its input channels):

* ``mean-abs``: mean |x| per channel, the diagonal scale of LQER-style θ.
* ``second-moment``: R = E[x·xᵀ], whose square root whitens the residual so its truncated SVD
  minimises the layer's *output* error over the calibration inputs (QERA, arXiv 2410.06040):
  θ = SVD_r(ΔW·R^{1/2})·R^{-1/2}. Weights that read the same input (q/k/v; gate/up) share one R.

R is d_in² floats per input: 8960² · 4 B = 321 MB for a 1.5B model's ``ffn_down``. The forward
passes are repeated over groups of layers so at most ``budget_bytes`` of R are held at once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

log = logging.getLogger(__name__)

STATS = ("mean-abs", "second-moment")
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
    """R^{1/2} and R^{-1/2} of a regularised second-moment matrix (float32, d_in × d_in)."""

    sqrt: torch.Tensor
    inv_sqrt: torch.Tensor


def whitening(r: torch.Tensor, damp: float = 0.01) -> Whitening:
    """Symmetric square roots of R + damp·mean(eig R)·I, by eigendecomposition in float64 (R is
    positive semi-definite up to rounding; the damping keeps R^{-1/2} bounded where a channel is
    (nearly) never used)."""
    r64 = r.double()
    r64 = 0.5 * (r64 + r64.T)
    evals, evecs = torch.linalg.eigh(r64)
    evals = evals.clamp_min(0)
    evals = evals + max(float(evals.mean()) * damp, 1e-12)
    sqrt = (evecs * evals.sqrt()) @ evecs.T
    inv = (evecs * evals.rsqrt()) @ evecs.T
    return Whitening(sqrt.float(), inv.float())


def calibration_batches(tokenizer, text: str, chunks: int, ctx: int) -> list[list[int]]:
    """The first ``chunks`` chunks of ``ctx`` tokens of ``text`` (at least one, shorter when the
    text is)."""
    ids = tokenizer.encode(text, add_special=True)
    n = max(1, min(chunks, len(ids) // ctx))
    return [ids[i * ctx : (i + 1) * ctx] for i in range(n)]


def calibration_stats(path: Path, targets: list[str], text: str, chunks: int, kind: str = "mean-abs",
                      ctx: int = 512, budget_bytes: int = DEFAULT_BUDGET,
                      progress: bool = False) -> dict[str, torch.Tensor]:
    """Per target: mean |x| (``[d_in]``) or E[x·xᵀ] (``[d_in, d_in]``), over ``chunks`` chunks
    of ``text`` (targets that share an input share the tensor object)."""
    from ..loader import load_model

    if kind not in STATS:
        raise ValueError(f"unknown activation statistic {kind!r} ({' or '.join(STATS)})")
    lm = load_model(path, device="cpu", context=ctx, progress=False, theta=False)
    modules = lm.model.linear_modules()
    present = [t for t in targets if t in modules]
    keys: dict[str, list[str]] = {}
    for t in present:
        keys.setdefault(input_key(t), []).append(t)
    batches = calibration_batches(lm.tokenizer, text, chunks, ctx)
    passes = _passes(keys, modules, kind, budget_bytes)
    out: dict[str, torch.Tensor] = {}
    for group in tqdm(passes, desc="calibration", unit="pass", disable=not progress or len(passes) == 1):
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        hooks = []
        for key in group:
            first = keys[key][0]  # one hook per shared input

            def hook(_mod, inputs, _out, key=key):
                x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
                stat = x.abs().sum(0) if kind == "mean-abs" else x.T @ x
                sums[key] = sums[key] + stat if key in sums else stat
                counts[key] = counts.get(key, 0) + x.shape[0]

            hooks.append(modules[first].register_forward_hook(hook))
        try:
            with torch.inference_mode():
                for chunk in batches:
                    lm.model(torch.tensor([chunk]), torch.arange(len(chunk)), last_only=True)
        finally:
            for h in hooks:
                h.remove()
        for key in group:
            if key in sums:
                stat = sums[key] / counts[key]
                for t in keys[key]:
                    out[t] = stat
    return out


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
