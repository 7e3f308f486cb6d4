"""Experiment: residual θ fitted block by block along the coarse model's own activations.

    python benchmarks/sequential_theta.py -i coarse.gguf --reference ref.gguf -o out.nkat --rank 8

Measured worse than the converter's per-layer θ (docs/theta-results.md §2c), so it is not a
converter mode; kept to reproduce that figure.

Per-layer residual θ (:mod:`.calibrate`, :mod:`.svd`) minimises each layer's output error for
the inputs it measured, as if every earlier layer were exact. In the coarse model they are not:
each block's input already carries the errors of the blocks before it, and they compound. Here
the calibration text runs through both models one block at a time, and each block's θ is fitted
to what the *reference* block computes from the reference's inputs, given the inputs the coarse
model (θ of the earlier blocks included) really gives it:

    min over rank-r Δ of  Σ_t ‖W_ref·x_ref,t − (W_c + Δ)·x_c,t‖²

With R = E[x_c·x_cᵀ], C = E[x_ref·x_cᵀ] and G = W_ref·C − W_c·R, the unconstrained optimum is
Δ* = G·R⁻¹, and the rank-r one is the truncated SVD of Δ*·L, taken back by L⁻¹, where R = L·Lᵀ
(Cholesky of the damped R): Δ = SVD_r(G·L⁻ᵀ)·L⁻¹. When the inputs agree (x_ref = x_c) this is
QERA's closed form. Within a block the four inputs are fitted in order (q/k/v, the attention
output, gate/up, down), each measured with the θ of those before it in place: fitted together,
down's θ learnt to undo the error that gate/up's θ then also removed, and overcorrected. Each fitted θ is quantised to the
file's int8 factors and put into the coarse model before the next block is measured, so later
blocks correct what the stored θ really leaves.

Cost: every block runs once in the reference and five times (four of them cut short) in the
coarse model, plus one Cholesky factorisation per shared input.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from nkat_runtime.model.theta_linear import ThetaLinear
from nkat_runtime.theta.calibrate import calibration_batches, whitening
from nkat_runtime.theta.factors import ThetaFactors
from nkat_runtime.theta.svd import SVDResult

log = logging.getLogger(__name__)

#: the groups of a block's targets that read one input, in the order they are fitted
STAGES = (("attn_q", "attn_k", "attn_v"), ("attn_output",), ("ffn_gate", "ffn_up"), ("ffn_down",))
DAMP = 0.01


class _Stop(Exception):
    """Raised by a capture hook to end a block's forward once its inputs are taken."""


def top_svd(m: torch.Tensor, rank: int) -> SVDResult:
    """The top ``rank`` singular triplets of ``m`` from the eigenvectors of its smaller Gram matrix
    (float64): exact for the leading triplets, and one small eigendecomposition instead of a full SVD."""
    m = m.double()
    wide = m.shape[0] <= m.shape[1]
    gram = m @ m.T if wide else m.T @ m
    evals, evecs = torch.linalg.eigh(gram)
    r = min(rank, evals.numel())
    top = evecs[:, -r:].flip(1)
    s = evals[-r:].flip(0).clamp_min(0).sqrt()
    safe = torch.where(s > 0, s, torch.ones_like(s))
    if wide:
        u, vh = top, (top.T @ m) / safe[:, None]
    else:
        u, vh = (m @ top) / safe[None, :], top.T
    return SVDResult(u.float(), s.float(), vh.float(), float(gram.diagonal().sum()))


def fit_delta(g: torch.Tensor, chol: torch.Tensor, rank: int) -> SVDResult:
    """The truncated SVD of G·L⁻ᵀ (Δ = U·S·Vᵀ·L⁻¹; :func:`delta_factors` applies the L⁻¹)."""
    m = torch.linalg.solve_triangular(chol, g.double().T, upper=False).T  # G·L⁻ᵀ
    return top_svd(m, rank)


def delta_factors(svd: SVDResult, chol: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """θ factors of the file's convention (θ = 2Δ, applied as 0.5·γ·θ): left [out, k], right [k, in]."""
    a, b = svd.factors(rank)
    right = torch.linalg.solve_triangular(chol.T, b.double().T, upper=True).T  # b·L⁻¹
    return 2.0 * a, right.float()


class _BlockRunner:
    """A model's calibration chunks, carried through its blocks one at a time."""

    def __init__(self, lm, batches: list[list[int]]) -> None:
        from nkat_runtime.model.kv_cache import BlockView

        self.model = lm.model
        self.hidden: list[torch.Tensor] = []
        self.context = []
        for chunk in batches:
            tokens = torch.tensor([chunk])
            pos = torch.arange(len(chunk))
            self.hidden.append(self.model.embed(tokens).float())
            glob, local = self.model.masks(pos, len(chunk))
            view = BlockView([self.model.row_table(0)], pos, [len(chunk)], self.model.kv.block_size)
            self.context.append((pos, glob, local, view))

    def run(self, i: int, capture: list[str], stop: str | None = None, advance: bool = False) -> dict[str, list]:
        """Run block ``i`` over every chunk, taking the inputs of the ``capture`` linears (ending the
        block at ``stop``'s input); ``advance``: keep the block's outputs as the next inputs."""
        layer = self.model.layers[i]
        modules = self.model.linear_modules()
        got: dict[str, list[torch.Tensor]] = {n: [] for n in capture}
        hooks = []
        for name in capture:
            def hook(_m, inputs, name=name):
                got[name].append(inputs[0].detach().float().reshape(-1, inputs[0].shape[-1]))
                if name == stop:
                    raise _Stop

            hooks.append(modules[name].register_forward_pre_hook(hook))
        try:
            with torch.inference_mode():
                for c, (pos, glob, local, view) in enumerate(self.context):
                    try:
                        out = layer(self.hidden[c], pos, local if layer.is_swa else glob, view)
                    except _Stop:
                        continue
                    if advance:
                        self.hidden[c] = out
        finally:
            for h in hooks:
                h.remove()
        return got


def _moments(xr: list[torch.Tensor], xc: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """R = E[x_c·x_cᵀ] and C = E[x_ref·x_cᵀ] (float64) over paired chunks."""
    n = sum(x.shape[0] for x in xc)
    r = sum(x.double().T @ x.double() for x in xc) / n
    c = sum(a.double().T @ b.double() for a, b in zip(xr, xc)) / n
    return r, c  # type: ignore[return-value]


def sequential_theta(coarse: Path, reference: Path, targets: list[str], text: str, chunks: int, rank: int,
                     weights: Callable[[str], tuple[torch.Tensor, torch.Tensor]], ctx: int = 512,
                     progress: bool = False) -> dict[str, tuple[ThetaFactors, float]]:
    """θ factors per target (``weights(name)`` → the coarse and reference weights, dequantised),
    with the share of its whitened residual each captures."""
    from nkat_runtime.loader import load_model

    lm_c = load_model(coarse, device="cpu", context=ctx, progress=False, theta=False)
    lm_r = load_model(reference, device="cpu", context=ctx, progress=False, theta=False)
    batches = calibration_batches(lm_c.tokenizer, text, chunks, ctx)
    run_c, run_r = _BlockRunner(lm_c, batches), _BlockRunner(lm_r, batches)
    wanted = set(targets)
    out: dict[str, tuple[ThetaFactors, float]] = {}
    layers = len(lm_c.model.layers)
    for i in tqdm(range(layers), desc="θ block by block", unit="block", disable=not progress):
        firsts = [f"blk.{i}.{s[0]}.weight" for s in STAGES]
        firsts = [f for f in firsts if f in lm_c.model.linear_modules()]
        ref_in = run_r.run(i, firsts, advance=True)
        for first in firsts:  # each stage measured with the θ of the stages before it in place
            coarse_in = run_c.run(i, [first], stop=first)
            stage = next(s for s in STAGES if f"blk.{i}.{s[0]}.weight" == first)
            names = [f"blk.{i}.{t}.weight" for t in stage if f"blk.{i}.{t}.weight" in wanted]
            if not names:
                continue
            r, c = _moments(ref_in[first], coarse_in[first])
            chol = whitening(r, DAMP).chol
            for name in names:
                w_c, w_ref = weights(name)
                svd = fit_delta(w_ref.double() @ c - w_c.double() @ r, chol, rank)
                factors = ThetaFactors.from_dense(*delta_factors(svd, chol, rank))
                out[name] = (factors, svd.energy_share(rank))
                base = lm_c.model.linear_modules()[name]
                lm_c.model.replace_linear(name, ThetaLinear(base, factors, 1.0))
        run_c.run(i, [], advance=True)
    log.info("sequential θ: %d targets over %d blocks, %d calibration chunks", len(out), layers, len(batches))
    return out


def main() -> int:
    from nkat_runtime.gguf.reader import open_gguf
    from nkat_runtime.theta import convert as cv

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--input", required=True, help="the coarse GGUF")
    p.add_argument("--reference", required=True, help="the finer GGUF of the same model")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--chunks", type=int, default=4, help="calibration chunks of 512 tokens (built-in text)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    src, ref = open_gguf(args.input), open_gguf(args.reference)
    targets = cv.plan_targets(src, None)
    text = cv.BUILTIN_CALIBRATION.read_text(encoding="utf-8")
    thetas = sequential_theta(Path(args.input), Path(args.reference), targets, text, args.chunks, args.rank,
                              lambda n: (cv.dequantized(src, n), cv.dequantized(ref, n)), progress=True)
    cv.write_nkat(src, Path(args.input), Path(args.output), thetas, "residual", args.rank, 1.0,
                  Path(args.reference))
    return 0


if __name__ == "__main__":
    sys.exit(main())
