"""GGUF → .nkat: add θ factors to chosen weights, copying the source byte for byte.

The output is a GGUF v3 file with every key/value pair and tensor of the source, the
``nkat.*`` keys and, per target weight T, ``T.theta_u`` / ``T.theta_u_scale`` /
``T.theta_v`` / ``T.theta_v_scale`` (see the .nkat spec). It is written to a temporary
file beside the output and renamed into place, never over the input.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np
import torch
from tqdm import tqdm

from .. import quant
from ..errors import NKATError
from ..gguf.names import BLOCK_WEIGHT, select, to_gguf
from ..gguf.reader import GGUFFile, open_gguf
from ..gguf.writer import write_derived_gguf
from .calibrate import (
    DEFAULT_CHUNKS,
    DEFAULT_STAT,
    STATS,
    Calibration,
    Whitening,
    calibration_groups,
    input_key,
    whitening,
)
from .factors import ThetaFactors, theta_tensor_names
from .ranks import allocate
from .svd import (
    DEFAULT_TARGET_SIZE,
    Scale,
    SVDResult,
    activation_scale,
    moyal_factors,
    residual_matrix,
    truncated_svd,
    unscaled,
)

if TYPE_CHECKING:
    from .distill import DistillReport

log = logging.getLogger(__name__)

NKAT_VERSION = 1
DATA_DIR = Path(__file__).parents[1] / "data"
BUILTIN_CALIBRATION = DATA_DIR / "calibration.txt"
BUILTIN_EVAL = DATA_DIR / "eval.txt"
OPTIMIZE_RANKS = (1, 2, 4, 6, 8, 12, 16, 24, 32)


class ConvertError(NKATError):
    """A conversion that cannot go on (bad paths, mismatched reference, ...)."""


@dataclass
class ConvertOptions:
    input: Path
    output: Path
    rank: int = 4
    gamma: float = 0.97
    mode: str | None = None  # None: residual when a reference is given, else moyal
    reference: Path | None = None
    calibration: Path | None = None  # None: the built-in text (residual mode)
    use_calibration: bool = True
    selective_layers: list[str] | None = None
    target_size: int = DEFAULT_TARGET_SIZE
    optimize_rank: bool = False
    energy_target: float = 0.5  # --optimize-rank: share of the target's energy θ must capture
    max_rank: int = 32
    calibration_chunks: int = DEFAULT_CHUNKS
    activation: str = DEFAULT_STAT  # calibration statistic: second-moment (QERA) or mean-abs (LQER)
    budget_bytes: int | None = None  # ranks per target chosen to fit this many θ bytes (theta/ranks.py)
    distill_steps: int = 0  # > 0: the per-layer θ refined end to end against the reference's logits (distill.py)
    distill_text: Path | None = None  # what it trains on (None: the calibration text)
    dry_run: bool = False
    progress: bool = True

    @property
    def resolved_mode(self) -> str:
        return self.mode or ("residual" if self.reference else "moyal")


@dataclass
class TargetResult:
    name: str
    shape: tuple[int, ...]
    rank: int  # stored k (2r for an antisymmetrised square weight)
    energy_share: float  # of W (moyal) or of the (scaled) residual (residual)
    bytes_added: int


@dataclass
class ConvertResult:
    output: Path | None
    mode: str
    activation_aware: bool
    targets: list[TargetResult] = field(default_factory=list)
    seconds: float = 0.0
    distill: "DistillReport | None" = None  # when --distill-steps ran

    @property
    def bytes_added(self) -> int:
        return sum(t.bytes_added for t in self.targets)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def matrix_weights(src: GGUFFile) -> list[str]:
    return [n for n, t in src.tensors.items() if n.endswith(".weight") and len(t.shape) == 2 and ".theta_" not in n]


def plan_targets(src: GGUFFile, selective: Iterable[str] | None) -> list[str]:
    """Default: every block weight; else the user's names/globs, among the 2-D weights
    (a glob skips norms and biases; a plain name of one is an error)."""
    if not selective:
        targets = [n for n in src.tensors if BLOCK_WEIGHT.match(n)]
    else:
        matrices = matrix_weights(src)
        for pat in selective:
            name = to_gguf(pat.strip())
            if name in src.tensors and name not in matrices:
                raise ConvertError(f"{name} is not a 2-D weight matrix; θ applies to matrices only")
        targets = select(selective, matrices)
    if not targets:
        raise ConvertError("no target weights selected")
    return targets


def check_paths(opts: ConvertOptions) -> None:
    if not opts.input.is_file():
        raise ConvertError(f"input not found: {opts.input}")
    if opts.output.exists() and opts.output.is_dir():
        raise ConvertError(f"output is a directory: {opts.output}")
    same = opts.output.resolve() == opts.input.resolve() or (
        opts.output.exists() and os.path.samefile(opts.output, opts.input))
    if same:
        raise ConvertError("the output path is the input file; choose another name (e.g. model.nkat)")
    if opts.reference is not None and not opts.reference.is_file():
        raise ConvertError(f"reference not found: {opts.reference}")
    if not opts.output.resolve().parent.is_dir():
        raise ConvertError(f"output folder does not exist: {opts.output.parent}")
    if opts.rank < 1 or opts.max_rank < 1:
        raise ConvertError("--theta-rank must be >= 1")
    if opts.resolved_mode not in ("moyal", "residual"):
        raise ConvertError(f"unknown mode {opts.mode!r} (moyal or residual)")
    if opts.resolved_mode == "residual" and opts.reference is None:
        raise ConvertError("residual mode needs --reference (a finer GGUF of the same model)")
    if opts.budget_bytes is not None and (opts.budget_bytes <= 0 or opts.optimize_rank
                                          or opts.resolved_mode != "residual"):
        raise ConvertError("--theta-budget needs residual mode, a size > 0, and no --optimize-rank")
    if opts.activation not in STATS:
        raise ConvertError(f"unknown --activation-stats {opts.activation!r} ({' or '.join(STATS)})")
    if opts.calibration_chunks < 1:
        raise ConvertError("--calibration-chunks must be >= 1")
    if opts.distill_steps < 0 or (opts.distill_steps and (opts.resolved_mode != "residual" or opts.gamma == 0)):
        raise ConvertError("--distill-steps needs residual mode (--reference), a γ other than 0 and steps >= 0")
    if opts.distill_text is not None and not opts.distill_text.is_file():
        raise ConvertError(f"distillation text not found: {opts.distill_text}")
    if opts.target_size < 8:
        raise ConvertError("--target-size must be >= 8")


def check_reference(src: GGUFFile, ref: GGUFFile) -> None:
    """Same weights, same shapes: else stop at the first mismatch."""
    for name in matrix_weights(src):
        if name not in ref.tensors:
            raise ConvertError(f"reference has no tensor {name}")
        if ref.tensors[name].shape != src.tensors[name].shape:
            raise ConvertError(f"shape mismatch for {name}: source {src.tensors[name].shape}, "
                               f"reference {ref.tensors[name].shape}")


def load_calibration(path: Path | None, chunks: int, kind: str) -> Calibration:
    """The calibration of residual θ: ``path`` (None: the built-in text), ``chunks`` chunks of it."""
    path = Path(path or BUILTIN_CALIBRATION)
    if not path.is_file():
        raise ConvertError(f"calibration text not found: {path}")
    return Calibration(path.read_text(encoding="utf-8"), chunks, kind)


def dequantized(g: GGUFFile, name: str) -> torch.Tensor:
    t = g.tensor(name)
    return quant.dequantize(t.raw_tensor(), t.qtype, t.shape)


@dataclass
class TargetSVD:
    """What θ of one target needs at any rank up to the SVD's: computed once, truncated per use
    (residual: the SVD's right vectors already taken back through the activation scaling)."""

    shape: tuple[int, ...]
    svd: SVDResult

    def factors(self, mode: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        if mode == "moyal":
            return moyal_factors(torch.empty(self.shape, device="meta"), self.svd, rank)
        return self.svd.factors(rank)


def _scale(name: str, stat: torch.Tensor, whitened: dict[str, Whitening]) -> Scale:
    """mean |x| → a floored per-channel scale; E[x·xᵀ] → its whitening, computed once per shared
    input (q/k/v and gate/up; ``whitened`` is the caller's cache, by input name)."""
    if stat.dim() == 1:
        return activation_scale(stat)
    key = input_key(name)
    if key not in whitened:
        if len(whitened) >= 4:  # one layer's inputs at most (a file may list attn_output between q and k)
            whitened.pop(next(iter(whitened)))
        whitened[key] = whitening(stat)
    return whitened[key]


def target_svds(mode: str, src: GGUFFile, targets: list[str], ref: GGUFFile | None,
                scales: dict[str, torch.Tensor] | None, max_rank: int, target_size: int = DEFAULT_TARGET_SIZE,
                bar: tqdm | None = None) -> dict[str, TargetSVD]:
    """The truncated SVD (rank ``max_rank``) of every target's θ source matrix."""
    out: dict[str, TargetSVD] = {}
    whitened: dict[str, Whitening] = {}
    for name in targets:
        w = dequantized(src, name)
        scale = _scale(name, scales[name], whitened) if scales and name in scales else None
        m = w if mode == "moyal" else residual_matrix(w, dequantized(ref, name), scale)  # type: ignore[arg-type]
        out[name] = TargetSVD(tuple(w.shape), unscaled(truncated_svd(m, max_rank, target_size), scale))
        if bar is not None:
            bar.update()
    return out


def theta_svds(mode: str, src: GGUFFile, path: Path, targets: list[str], ref: GGUFFile | None,
               cal: Calibration | None, max_rank: int, target_size: int = DEFAULT_TARGET_SIZE,
               progress: bool = True) -> dict[str, TargetSVD]:
    """:func:`target_svds` of every target, activation-aware when ``cal`` is given: the statistics
    of ``path`` (the model ``src`` was read from) are taken a group of layers at a time and dropped
    once that group's SVDs are done (a 1.5B model's second moments are 10 GB in all)."""
    out: dict[str, TargetSVD] = {}
    with tqdm(total=len(targets), desc="θ by SVD", unit="tensor", disable=not progress) as bar:
        if cal is not None:
            for stats in calibration_groups(path, targets, cal, progress):
                out.update(target_svds(mode, src, [t for t in targets if t in stats], ref, stats, max_rank,
                                       target_size, bar))
                del stats
        rest = [t for t in targets if t not in out]
        out.update(target_svds(mode, src, rest, ref, None, max_rank, target_size, bar))
    return {t: out[t] for t in targets}


def compute_theta(opts: ConvertOptions, src: GGUFFile, targets: list[str], ref: GGUFFile | None,
                  cal: Calibration | None) -> dict[str, tuple[ThetaFactors, float]]:
    mode = opts.resolved_mode
    max_r = opts.max_rank if opts.optimize_rank or opts.budget_bytes else opts.rank
    out: dict[str, tuple[ThetaFactors, float]] = {}
    svds = theta_svds(mode, src, opts.input, targets, ref, cal, max_r, opts.target_size, opts.progress)
    budget = allocate({n: (t.shape, t.svd) for n, t in svds.items()}, opts.budget_bytes, max_r) \
        if opts.budget_bytes else {}
    for name, t in svds.items():
        rank = budget.get(name, opts.rank)
        if opts.budget_bytes and rank == 0:
            continue  # its residual buys less than the others': no θ on it
        if opts.optimize_rank:
            fits = [r for r in OPTIMIZE_RANKS if r <= max_r and t.svd.energy_share(r) >= opts.energy_target]
            rank = fits[0] if fits else max_r
        out[name] = (ThetaFactors.from_dense(*t.factors(mode, rank)), t.svd.energy_share(rank))
    return out


def theta_tensors(thetas: dict[str, tuple[ThetaFactors, float]]) -> dict[str, tuple[np.ndarray, None]]:
    """The four GGUF tensors per target (int8 factors, float32 scales)."""
    out: dict[str, tuple[np.ndarray, None]] = {}
    for name, (f, _) in thetas.items():
        u, su, v, sv = theta_tensor_names(name)
        out[u] = (f.u.numpy(), None)
        out[su] = (f.u_scale.float().numpy(), None)
        out[v] = (f.v.numpy(), None)
        out[sv] = (f.v_scale.float().numpy(), None)
    return out


def write_nkat(src: GGUFFile, input_path: Path, output: Path, thetas: dict[str, tuple[ThetaFactors, float]],
               mode: str, rank: int, gamma: float, reference: Path | None = None, progress: bool = True,
               extra_uint: dict[str, int] | None = None) -> None:
    """Write ``src`` plus θ tensors and ``nkat.*`` keys (``extra_uint``: more UINT32 ones) to
    ``output`` (temp file, then rename)."""
    import gguf

    V = gguf.GGUFValueType
    extra = {
        "nkat.version": (NKAT_VERSION, V.UINT32, None),
        "nkat.source.sha256": (sha256_file(input_path), V.STRING, None),
        "nkat.theta.mode": (mode, V.STRING, None),
        "nkat.theta.rank": (rank, V.UINT32, None),
        "nkat.theta.gamma": (float(gamma), V.FLOAT32, None),
        "nkat.theta.targets": (list(thetas), V.ARRAY, V.STRING),
    }
    for key, value in (extra_uint or {}).items():
        extra[key] = (int(value), V.UINT32, None)
    if reference is not None:
        extra["nkat.reference.sha256"] = (sha256_file(reference), V.STRING, None)
    # a .nkat given as input: its old θ and nkat keys are replaced
    write_derived_gguf(src, output, extra_kv=extra, add=theta_tensors(thetas),
                       drop=lambda n: ".theta_" in n or n.startswith("nkat."), progress=progress)


def read_distill_text(path: Path | None, calibration: Path | None) -> str:
    """The distillation's text: ``path``, else the calibration text, else the built-in one."""
    path = Path(path or calibration or BUILTIN_CALIBRATION)
    if not path.is_file():
        raise ConvertError(f"distillation text not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConvertError(f"distillation text {path} is not UTF-8: {e}") from None


def distilled(opts: ConvertOptions, thetas: dict[str, tuple[ThetaFactors, float]], text: str):
    """``thetas`` refined by :func:`.distill.distill` on ``text`` (each keeps the residual share it
    started from), and the distillation's report."""
    from .distill import DistillOptions, distill

    try:
        factors, report = distill(opts.input, opts.reference, {n: f for n, (f, _) in thetas.items()}, opts.gamma,
                                  text, DistillOptions(steps=opts.distill_steps), opts.progress)
    except ValueError as e:
        raise ConvertError(str(e)) from None
    return {n: (factors[n], share) for n, (_, share) in thetas.items()}, report


def convert(opts: ConvertOptions) -> ConvertResult:
    t0 = time.perf_counter()
    check_paths(opts)
    src = open_gguf(opts.input)
    targets = plan_targets(src, opts.selective_layers)
    mode = opts.resolved_mode
    ref = open_gguf(opts.reference) if opts.reference else None
    if ref is not None:
        if ref.architecture != src.architecture:
            raise ConvertError(f"reference architecture {ref.architecture} differs from {src.architecture}")
        check_reference(src, ref)
    aware = mode == "residual" and opts.use_calibration
    text = read_distill_text(opts.distill_text, opts.calibration) if opts.distill_steps and not opts.dry_run else ""
    cal = load_calibration(opts.calibration, opts.calibration_chunks, opts.activation) if aware else None
    result = ConvertResult(output=None, mode=mode, activation_aware=aware)
    thetas = compute_theta(opts, src, targets, ref, cal)
    extra = {}
    if opts.distill_steps and not opts.dry_run:
        thetas, result.distill = distilled(opts, thetas, text)
        extra["nkat.theta.distill_steps"] = opts.distill_steps
    for name, (f, share) in thetas.items():
        nbytes = f.u.numel() + f.v.numel() + 4 * (f.u_scale.numel() + f.v_scale.numel())
        result.targets.append(TargetResult(name, src.tensors[name].shape, f.rank, share, nbytes))
    if not opts.dry_run:
        rank = opts.rank if not opts.optimize_rank else max(t.rank for t in result.targets)
        write_nkat(src, opts.input, opts.output, thetas, mode, rank, opts.gamma, opts.reference, opts.progress, extra)
        result.output = opts.output
    result.seconds = time.perf_counter() - t0
    return result
