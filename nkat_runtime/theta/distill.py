"""θ refined end to end: every factor trained by distillation from the reference model's logits.

Per-layer residual θ (:mod:`.svd`, :mod:`.calibrate`) minimises each layer's output error as if
its inputs were exact. In the coarse model they are not: the errors of the layers before it
compound, and no per-layer fit sees them (docs/theta-results.md §2c, §2e). Here the per-layer θ
is only the start: all factors are parameters of the whole model and Adam moves them to minimise
KL(reference ‖ coarse + θ) of the next-token distributions, on chunks of real text (the
reference's distribution is the target, computed on the fly without gradient). Only the factors
move: coarse weights, norms and embeddings stay, so the file keeps its size. The factors are
re-quantised to the file's int8 rows afterwards.

Both models run on the reference path (float32 dense math) with the KV cache bypassed: a chunk
from position 0 attends over the keys it has just computed. The loss is taken at ``positions``
random positions of each chunk (every block still runs on all of them): the LM head over a large
vocabulary is the costliest product, and neighbouring positions say much the same.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .factors import ThetaFactors

log = logging.getLogger(__name__)


@dataclass
class DistillOptions:
    steps: int = 200  # one chunk per step
    ctx: int = 512
    positions: int = 128  # of each chunk, where the loss is taken
    lr: float = 0.01  # Adam's step as a share of each factor's RMS (cosine decay to 0)
    eval_chunks: int = 2  # held out: the text's last chunks, never trained on
    seed: int = 0


@dataclass
class DistillReport:
    kl_before: float  # mean KL(reference ‖ model) per position on the held-out chunks, nats
    kl_after: float
    train_chunks: int
    eval_chunks: int
    steps: int
    losses: list[float] = field(default_factory=list)


class TrainedTheta(nn.Module):
    """``x·Wᵀ (+ b) + (x·Vᵀ)·Uᵀ`` with W, b frozen; U (= 0.5·γ·U') and V (= V') are trained."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, u: torch.Tensor, v: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.u = nn.Parameter(u.detach().float().clone())
        self.v = nn.Parameter(v.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.v), self.u)


class _OwnKeys:
    """A stand-in cache for one sequence from position 0: attention reads the keys just computed."""

    def update(self, view, k, v):
        return [(k, v)]

    def rotate_q(self, q):
        return q

    def unrotate_out(self, out):
        return out


def bypass_cache(model: nn.Module) -> None:
    """Run ``model``'s blocks on :class:`_OwnKeys` (for :func:`chunk_logits` only)."""
    for layer in model.layers:
        layer.cache = _OwnKeys()


def chunk_logits(model: nn.Module, tokens: torch.Tensor, at: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [T, V] of one chunk (tokens [1, T], positions 0..T-1), differentiably; ``at``: only
    those positions'. The model's caches must be bypassed (:func:`bypass_cache`)."""
    t = tokens.shape[1]
    pos = torch.arange(t)
    x = model._layers(model.embed(tokens), pos, *model.masks(pos, t), None)[0]
    return model._logits(x if at is None else x[at])


def kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(p_teacher ‖ p_student), nats."""
    lt = torch.log_softmax(teacher.float(), dim=-1)
    ls = torch.log_softmax(student.float(), dim=-1)
    return (lt.exp() * (lt - ls)).sum(-1).mean()


def text_chunks(tokenizer, text: str, ctx: int) -> list[list[int]]:
    """Every whole chunk of ``ctx`` tokens of ``text``, as perplexity evaluates them."""
    from ..eval.perplexity import eval_chunk

    ids = tokenizer.encode(text, add_special=True)
    return [eval_chunk(tokenizer, ids, ctx, i) for i in range(len(ids) // ctx)]


def attach(model: nn.Module, thetas: dict[str, ThetaFactors], gamma: float) -> dict[str, TrainedTheta]:
    """Put a :class:`TrainedTheta` at every θ target of a reference-path ``model`` (no θ of its own)."""
    modules = model.linear_modules()
    out: dict[str, TrainedTheta] = {}
    for name, f in thetas.items():
        base = modules[name]
        out[name] = TrainedTheta(base.weight, getattr(base, "bias", None), 0.5 * gamma * f.left(), f.right())
        model.replace_linear(name, out[name])
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in out.values():
        layer.u.requires_grad_(True)
        layer.v.requires_grad_(True)
    return out


def held_out_kl(student: nn.Module, teacher: nn.Module, chunks: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return sum(float(kl(chunk_logits(teacher, c), chunk_logits(student, c))) for c in chunks) / len(chunks)


def distill(coarse: Path, reference: Path, thetas: dict[str, ThetaFactors], gamma: float, text: str,
            opts: DistillOptions, progress: bool = True) -> tuple[dict[str, ThetaFactors], DistillReport]:
    """θ of ``coarse`` (a GGUF without θ) trained towards ``reference``'s logits on ``text``;
    returns the new factors (for ``gamma``) and what the held-out KL did."""
    from ..loader import load_model

    if gamma == 0:
        raise ValueError("distillation needs γ ≠ 0")
    student = load_model(coarse, reference=True, context=opts.ctx, progress=False, theta=False)
    teacher = load_model(reference, reference=True, context=opts.ctx, progress=False, theta=False).model
    layers = attach(student.model, thetas, gamma)
    bypass_cache(student.model)
    bypass_cache(teacher)
    chunks = text_chunks(student.tokenizer, text, opts.ctx)
    if len(chunks) < opts.eval_chunks + 1:
        raise ValueError(f"the distillation text gives {len(chunks)} chunks of {opts.ctx} tokens; "
                         f"at least {opts.eval_chunks + 1} are needed")
    train = chunks[: len(chunks) - opts.eval_chunks]
    evals = [torch.tensor([c]) for c in chunks[len(train) :]]
    groups = []
    for layer in layers.values():
        for prm in (layer.u, layer.v):
            rms = float(prm.detach().pow(2).mean().sqrt()) or 1e-3
            groups.append({"params": [prm], "lr": opts.lr * rms, "base": opts.lr * rms})
    opt = torch.optim.Adam(groups, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(opts.seed)
    report = DistillReport(held_out_kl(student.model, teacher, evals), float("nan"), len(train), len(evals),
                            opts.steps)
    log.info("distillation: %d θ targets, %d training chunks of %d tokens (%s), %d steps; held-out KL %.5f",
             len(layers), len(train), opts.ctx, "each once" if opts.steps <= len(train) else "repeated",
             opts.steps, report.kl_before)
    order = torch.randperm(len(train), generator=gen).tolist()
    positions = min(opts.positions, opts.ctx)
    bar = tqdm(range(opts.steps), desc="distil θ", unit="step", disable=not progress)
    for step in bar:
        tokens = torch.tensor([train[order[step % len(train)]]])
        at = torch.randperm(opts.ctx, generator=gen)[:positions].sort().values
        with torch.no_grad():
            target = chunk_logits(teacher, tokens, at)
        loss = kl(target, chunk_logits(student.model, tokens, at))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        decay = 0.5 * (1 + math.cos(math.pi * (step + 1) / opts.steps))
        for g in opt.param_groups:
            g["lr"] = g["base"] * decay
        opt.step()
        report.losses.append(loss.item())
        bar.set_postfix(kl=f"{report.losses[-1]:.4f}")
    report.kl_after = held_out_kl(student.model, teacher, evals)
    log.info("distillation: held-out KL %.5f → %.5f", report.kl_before, report.kl_after)
    with torch.no_grad():
        out = {name: ThetaFactors.from_dense(layer.u / (0.5 * gamma), layer.v) for name, layer in layers.items()}
    return out, report
