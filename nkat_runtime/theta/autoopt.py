"""The auto-optimiser's measurements: one loaded model, θ from SVDs computed once, and a
trial = (rank, γ) → measured perplexity, decode speed against θ off, and the TPE score.

The model is the fast path (what the server runs): θ is not folded there, so its cost per
token is real and measured. Ranks are truncations of one SVD per target at the largest rank
searched; γ only rescales the θ term. γ = 0 is the baseline: the source model itself.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import NKATError
from ..eval.bench import time_decode, time_prefill, tpe_score
from ..eval.perplexity import perplexity_of_tokens
from ..gguf.reader import open_gguf
from ..loader import load_model
from ..model.theta_linear import ThetaLinear, set_theta_gamma
from .calibrate import DEFAULT_CHUNKS, DEFAULT_STAT
from .convert import (
    TargetSVD,
    check_reference,
    load_calibration,
    plan_targets,
    theta_svds,
    write_nkat,
)
from .factors import ThetaFactors

if TYPE_CHECKING:
    from .distill import DistillReport

log = logging.getLogger(__name__)

RANKS = {"moyal": (2, 4, 6, 8), "residual": (2, 4, 6, 8, 16, 32)}
GAMMA_MAX = {"moyal": 0.99, "residual": 1.5}


@dataclass
class SearchConfig:
    model: Path
    reference: Path | None = None
    calibration: Path | None = None
    eval_file: Path | None = None  # None: the built-in Wikipedia excerpt
    eval_chunks: int = 2
    ctx: int = 512
    decode_steps: int = 16
    target_rank: int | None = None
    device: str | None = None
    progress: bool = True
    activation: str = DEFAULT_STAT  # residual θ's calibration statistic (theta/calibrate.py)
    calibration_chunks: int = DEFAULT_CHUNKS

    @property
    def theta_mode(self) -> str:
        return "residual" if self.reference else "moyal"

    @property
    def ranks(self) -> tuple[int, ...]:
        return (self.target_rank,) if self.target_rank else RANKS[self.theta_mode]


@dataclass
class TrialResult:
    rank: int
    gamma: float
    perplexity: float
    tokens_per_second: float  # decode with θ
    baseline_tokens_per_second: float  # decode with θ off, interleaved in the same trial
    overhead: float  # λ_θ: fractional slowdown, clamped at 0 (0 for the baseline)
    tpe: float
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


class ThetaSearch:
    """Everything a trial needs, prepared once."""

    def __init__(self, cfg: SearchConfig) -> None:
        from .convert import BUILTIN_EVAL

        self.cfg = cfg
        self.src = open_gguf(cfg.model)
        self.targets = plan_targets(self.src, None)
        ref = None
        if cfg.reference is not None:
            ref = open_gguf(cfg.reference)
            if ref.architecture != self.src.architecture:
                raise NKATError(f"reference architecture {ref.architecture} differs from {self.src.architecture}")
            check_reference(self.src, ref)
        cal = load_calibration(cfg.calibration, cfg.calibration_chunks, cfg.activation) if ref is not None else None
        self.svds: dict[str, TargetSVD] = theta_svds(cfg.theta_mode, self.src, cfg.model, self.targets, ref, cal,
                                                     max(cfg.ranks), progress=cfg.progress)
        self.lm = load_model(cfg.model, device=cfg.device, context=cfg.ctx, progress=cfg.progress, theta=False)
        modules = self.lm.model.linear_modules()
        self.bases = {name: modules[name] for name in self.targets}
        eval_path = cfg.eval_file or BUILTIN_EVAL
        if not Path(eval_path).is_file():
            raise NKATError(f"eval file not found: {eval_path}")
        self.eval_ids = self.lm.tokenizer.encode(Path(eval_path).read_text(encoding="utf-8"), add_special=True)
        if len(self.eval_ids) < cfg.ctx:
            raise NKATError(f"{eval_path}: {len(self.eval_ids)} tokens, need at least {cfg.ctx} for perplexity")
        self._rank = 0  # rank of the θ layers installed in the model (0: none yet)

    def factors(self, rank: int) -> dict[str, tuple[ThetaFactors, float]]:
        """θ of every target at ``rank`` (int8, as a .nkat file stores it) and its energy share."""
        mode = self.cfg.theta_mode
        return {n: (ThetaFactors.from_dense(*t.factors(mode, rank)), t.svd.energy_share(rank))
                for n, t in self.svds.items()}

    def apply(self, rank: int, gamma: float) -> None:
        if rank != self._rank:
            for name, (f, _) in self.factors(rank).items():
                self.lm.model.replace_linear(name, ThetaLinear(self.bases[name], f, gamma, torch.float32))
            self._rank = rank
        set_theta_gamma(self.lm.model, gamma)

    def _decode_seconds(self) -> list[float]:
        _, tok = time_prefill(self.lm, self.eval_ids[:1])
        return time_decode(self.lm, 1, tok, self.cfg.decode_steps).step_seconds

    def evaluate(self, rank: int, gamma: float) -> TrialResult:
        t0 = time.perf_counter()
        self.apply(rank, gamma)
        ppl = perplexity_of_tokens(self.lm, self.eval_ids, self.cfg.ctx, self.cfg.eval_chunks).ppl
        on: list[float] = []
        off: list[float] = []
        for _ in range(3):  # interleaved, so load on a shared machine hits both alike
            set_theta_gamma(self.lm.model, 0.0)
            off += self._decode_seconds()
            set_theta_gamma(self.lm.model, gamma)
            on += self._decode_seconds()
        base_tps = 1.0 / statistics.median(off)
        tps = 1.0 / statistics.median(on) if gamma else base_tps
        overhead = max(0.0, base_tps / tps - 1.0) if gamma else 0.0
        return TrialResult(rank, gamma, ppl, tps, base_tps, overhead, tpe_score(ppl, overhead),
                           time.perf_counter() - t0)

    def distilled(self, rank: int, gamma: float, text: str, steps: int) -> tuple[dict, "DistillReport", float]:
        """θ of (rank, γ) trained end to end against the reference (:mod:`.distill`) for ``steps``
        chunks of ``text``: the factors (each with the energy share it started from), the
        distillation's report, and the perplexity they measure on the trials' chunks."""
        from .distill import DistillOptions, distill

        start = self.factors(rank)
        new, report = distill(self.cfg.model, self.cfg.reference, {n: f for n, (f, _) in start.items()}, gamma,
                              text, DistillOptions(steps=steps, ctx=self.cfg.ctx), self.cfg.progress)
        for name, f in new.items():
            self.lm.model.replace_linear(name, ThetaLinear(self.bases[name], f, gamma, torch.float32))
        self._rank = -1  # not the SVD's θ any more: apply() reinstalls
        ppl = perplexity_of_tokens(self.lm, self.eval_ids, self.cfg.ctx, self.cfg.eval_chunks).ppl
        return {n: (new[n], share) for n, (_, share) in start.items()}, report, ppl

    def write(self, output: Path, rank: int, gamma: float, thetas: dict | None = None,
              distill_steps: int = 0) -> None:
        """The .nkat file of (rank, γ), from the same SVDs the trials used (or ``thetas``, distilled)."""
        extra = {"nkat.theta.distill_steps": distill_steps} if distill_steps else None
        write_nkat(self.src, self.cfg.model, output, thetas or self.factors(rank), self.cfg.theta_mode, rank, gamma,
                   self.cfg.reference, self.cfg.progress, extra)

    def check_distill_text(self, text: str) -> None:
        """Before any trial: enough whole chunks of ``text`` for the distillation."""
        from .distill import DistillOptions, text_chunks

        need = DistillOptions().eval_chunks + 1
        have = len(text_chunks(self.lm.tokenizer, text, self.cfg.ctx))
        if have < need:
            raise NKATError(f"the distillation text gives {have} chunks of {self.cfg.ctx} tokens; at least {need} "
                            f"are needed")
