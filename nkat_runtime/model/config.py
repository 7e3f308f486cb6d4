"""Hyper-parameters of a decoder-only transformer, read from GGUF metadata.

One dataclass for every architecture: the generic keys are read here, and each model
file sets its architecture's quirks (rope style, norms, activation, biases).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import ModelFormatError, UnsupportedError

# counts a model may have (far above any released model; they bound what a crafted file can allocate)
COUNT_CAPS = {"n_layer": 1024, "n_embd": 1 << 17, "n_head": 4096, "n_head_kv": 4096, "head_dim": 1 << 13,
              "n_ff": 1 << 20, "vocab_size": 1 << 22, "context_length": 1 << 24, "rope_dim": 1 << 13}


@dataclass
class Yarn:
    """YaRN rope scaling (GGUF ``rope.scaling.type = yarn``), as llama.cpp's ``rope_yarn`` applies it."""

    factor: float  # context extension factor (frequencies interpolated by 1/factor)
    orig_ctx: int  # the context the model was trained with
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    ext_factor: float = 1.0  # how much of the extrapolation ramp is used (llama.cpp default for yarn: 1)


@dataclass
class ModelConfig:
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    vocab_size: int
    rms_eps: float
    context_length: int
    rope_base: float
    rope_dim: int
    rope_neox: bool = False  # False: adjacent pairs (llama.cpp "normal"), True: halves (NEOX)
    rope_scale: float = 1.0  # linear rope scaling factor (positions are divided by it)
    yarn: Yarn | None = None  # YaRN scaling instead of linear
    longrope: bool = False  # phi3: rope_factors_long/short tensors, chosen by the context size
    rope_orig_ctx: int = 0  # rope.scaling.original_context_length (0: not given)
    rope_attn_factor: float = 1.0  # rope.scaling.attn_factor: scales q and k (read where handled: YaRN, phi3)
    fused_gate_up: bool = False  # phi3: ffn_up holds gate then up
    # mixture of experts (``moe.py``): experts per layer, experts used per token, expert FFN width
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_expert: int = 0
    expert_weights_scale: float = 0.0
    # sliding-window attention (gemma3): window, pattern (every n-th layer is global), local base
    sliding_window: int = 0
    swa_layers: list[bool] = field(default_factory=list)
    rope_base_swa: float = 10_000.0
    attn_scale: float = 0.0  # 0 → 1/sqrt(head_dim)
    attn_softcap: float = 0.0  # > 0: scores → c·tanh(scores / c) before the softmax (gemma2)
    final_softcap: float = 0.0  # > 0: logits → c·tanh(logits / c)
    act: str = "silu"  # "silu" | "gelu_tanh"
    qkv_bias: bool = False
    qk_norm: bool = False
    post_norms: bool = False
    embed_scale: float = 1.0
    # math-changing metadata keys (``checks.MATH_KEYS``) this architecture's config reads
    handled: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        for name, cap in COUNT_CAPS.items():  # before anything is sized by them
            value = getattr(self, name)
            if not isinstance(value, int) or not 1 <= value <= cap:
                raise ModelFormatError(f"model hyper-parameter {name} = {value!r} is outside 1..{cap}")
        if not self.swa_layers:
            self.swa_layers = [False] * self.n_layer
        if self.attn_scale == 0.0:
            self.attn_scale = self.head_dim**-0.5


def _int(meta: dict[str, Any], key: str, default: int | None = None) -> int:
    value = meta.get(key, default)
    if value is None:
        raise ModelFormatError(f"metadata key {key!r} is missing")
    if isinstance(value, list):  # per-layer arrays (e.g. head_count_kv): all equal supported
        if not value or len(set(value)) != 1:
            raise ModelFormatError(f"metadata key {key!r}: per-layer values {value[:8]}... are not supported")
        value = value[0]
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise ModelFormatError(f"metadata key {key!r} is not an integer: {value!r}") from None
    if out < 0:
        raise ModelFormatError(f"metadata key {key!r} is negative: {out}")
    return out


def _float(meta: dict[str, Any], key: str, default: float) -> float:
    value = meta.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ModelFormatError(f"metadata key {key!r} is not a number: {value!r}")
    return float(value)


def base_config(meta: dict[str, Any], arch: str, vocab_size: int, longrope: bool = False,
                experts: bool = False) -> ModelConfig:
    """The keys every llama-like architecture shares (``<arch>.block_count`` etc.); ``longrope``:
    the architecture implements rope scaling type ``longrope``; ``experts``: its files may be
    mixtures of experts (``expert_count``)."""
    p = f"{arch}."
    n_embd = _int(meta, p + "embedding_length")
    n_head = _int(meta, p + "attention.head_count")
    if n_head == 0 or n_embd == 0:
        raise ModelFormatError("embedding_length and attention.head_count must be positive")
    head_dim = _int(meta, p + "attention.key_length", n_embd // n_head)
    n_head_kv = _int(meta, p + "attention.head_count_kv", n_head)
    if n_head_kv == 0 or n_head % n_head_kv:
        raise ModelFormatError(f"head_count {n_head} is not a multiple of head_count_kv {n_head_kv}")
    scale, yarn = 1.0, None
    scaling_type = meta.get(p + "rope.scaling.type")
    if scaling_type in ("linear",):
        scale = _float(meta, p + "rope.scaling.factor", 1.0) or 1.0
    elif scaling_type == "yarn":
        yarn = _yarn(meta, p)
    elif scaling_type == "longrope" and longrope:
        pass  # the architecture reads its factor tensors and attention factor itself
    elif scaling_type not in (None, "none"):
        raise UnsupportedError(f"rope scaling type {scaling_type!r} is not supported (linear and yarn are)")
    cfg = ModelConfig(
        arch=arch,
        n_layer=_int(meta, p + "block_count"),
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        n_ff=_int(meta, p + "feed_forward_length"),
        vocab_size=vocab_size,
        rms_eps=_float(meta, p + "attention.layer_norm_rms_epsilon", 1e-6),
        context_length=_int(meta, p + "context_length", 4096),
        rope_base=_float(meta, p + "rope.freq_base", 10_000.0),
        rope_dim=_int(meta, p + "rope.dimension_count", head_dim),
        rope_scale=scale,
        yarn=yarn,
    )
    cfg.rope_orig_ctx = _int(meta, p + "rope.scaling.original_context_length", 0)
    if experts and _int(meta, p + "expert_count", 0):
        cfg.n_expert = _int(meta, p + "expert_count")
        cfg.n_expert_used = _int(meta, p + "expert_used_count", 0)
        if not 1 <= cfg.n_expert_used <= cfg.n_expert <= 1 << 12:
            raise ModelFormatError(f"expert_used_count {cfg.n_expert_used} must be within 1..expert_count "
                                   f"{cfg.n_expert} (at most 4096)")
        cfg.n_ff_expert = _int(meta, p + "expert_feed_forward_length", cfg.n_ff)
        cfg.expert_weights_scale = _float(meta, p + "expert_weights_scale", 0.0)
        cfg.handled = cfg.handled | {"expert_count"}
    cfg.rope_attn_factor = _float(meta, p + "rope.scaling.attn_factor", 1.0)  # refused unless handled
    if yarn is not None:
        cfg.handled = cfg.handled | {"rope.scaling.attn_factor"}
    return cfg


def _yarn(meta: dict[str, Any], p: str) -> Yarn:
    if _float(meta, p + "rope.scaling.yarn_log_multiplier", 0.0):
        raise UnsupportedError(f"metadata {p}rope.scaling.yarn_log_multiplier (DeepSeek-style YaRN) is not supported")
    factor = _float(meta, p + "rope.scaling.factor", 1.0)
    orig = _int(meta, p + "rope.scaling.original_context_length", _int(meta, p + "context_length", 4096))
    if not (factor >= 1.0 and orig > 0):
        raise ModelFormatError(f"YaRN needs rope.scaling.factor >= 1 and an original context > 0, not {factor}, {orig}")
    return Yarn(factor, orig, _float(meta, p + "rope.scaling.yarn_beta_fast", 32.0),
                _float(meta, p + "rope.scaling.yarn_beta_slow", 1.0),
                _float(meta, p + "rope.scaling.yarn_ext_factor", 1.0))
