"""Sanity of a model file beyond its GGUF framing: hyper-parameters within caps, and every
known tensor the shape those hyper-parameters give it. Checked before any allocation, so a
crafted or damaged file is refused with the field named, never by a crash or a huge buffer."""

from __future__ import annotations

import math
from typing import Any

from ..errors import ModelFormatError
from .config import ModelConfig


def validate_config(cfg: ModelConfig) -> None:
    """Relations between the counts (capped by ``ModelConfig`` itself); every float finite and in range."""
    if not 0 <= cfg.sliding_window <= 1 << 24:  # a window beyond the context is allowed: it never cuts
        raise ModelFormatError(f"sliding_window {cfg.sliding_window} is outside 0..{1 << 24}")
    if cfg.n_head % cfg.n_head_kv:
        raise ModelFormatError(f"head_count {cfg.n_head} is not a multiple of head_count_kv {cfg.n_head_kv}")
    if cfg.rope_dim > cfg.head_dim or cfg.rope_dim % 2:
        raise ModelFormatError(f"rope.dimension_count {cfg.rope_dim} must be even and at most the head size "
                               f"{cfg.head_dim}")
    for name in ("rope_base", "rope_base_swa", "rope_scale"):
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value > 0):
            raise ModelFormatError(f"model hyper-parameter {name} = {value!r} must be a positive number")
    for name in ("rms_eps", "attn_scale", "embed_scale"):
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value >= 0):
            raise ModelFormatError(f"model hyper-parameter {name} = {value!r} must be a finite number >= 0")
    if len(cfg.swa_layers) != cfg.n_layer:
        raise ModelFormatError(f"sliding-window pattern covers {len(cfg.swa_layers)} of {cfg.n_layer} layers")


def expected_shapes(cfg: ModelConfig, n_vocab_rows: int) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape (torch order, [out, in]) for every tensor the model may read."""
    q, kv, d, ff = cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim, cfg.n_embd, cfg.n_ff
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (n_vocab_rows, d), "output.weight": (n_vocab_rows, d), "output_norm.weight": (d,)}
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        shapes.update({
            p + "attn_norm.weight": (d,), p + "ffn_norm.weight": (d,), p + "post_attention_norm.weight": (d,),
            p + "post_ffw_norm.weight": (d,), p + "attn_q_norm.weight": (cfg.head_dim,),
            p + "attn_k_norm.weight": (cfg.head_dim,), p + "attn_q.weight": (q, d), p + "attn_k.weight": (kv, d),
            p + "attn_v.weight": (kv, d), p + "attn_output.weight": (d, q), p + "ffn_gate.weight": (ff, d),
            p + "ffn_up.weight": (ff, d), p + "ffn_down.weight": (d, ff), p + "attn_q.bias": (q,),
            p + "attn_k.bias": (kv,), p + "attn_v.bias": (kv,),
        })
    return shapes


def check_tensors(cfg: ModelConfig, tensors: dict[str, Any], n_tokens: int) -> None:
    """Known tensors have their expected shapes; the tokenizer's ids fit the embedding table."""
    embd = tensors.get("token_embd.weight")
    if embd is None:
        raise ModelFormatError("tensor 'token_embd.weight' is missing")
    rows = embd.shape[0]
    if n_tokens > rows:
        raise ModelFormatError(f"the tokenizer has {n_tokens} tokens but token_embd.weight only {rows} rows")
    for name, shape in expected_shapes(cfg, rows).items():
        t = tensors.get(name)
        if t is not None and tuple(t.shape) != shape:
            raise ModelFormatError(f"tensor {name!r} has shape {list(t.shape)}; the model's hyper-parameters "
                                   f"give {list(shape)}")
