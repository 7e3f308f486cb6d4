"""Sanity of a model file beyond its GGUF framing: hyper-parameters within caps, and every
known tensor the shape those hyper-parameters give it. Checked before any allocation, so a
crafted or damaged file is refused with the field named, never by a crash or a huge buffer."""

from __future__ import annotations

import math
from typing import Any

from ..errors import ModelFormatError, UnsupportedError
from .config import ModelConfig

#: tensors a file may carry that the math does not read, and why that is safe (the one list)
HARMLESS_TENSORS = {
    "attn_rot_embd": "rotary inverse frequencies stored by old converters; recomputed from rope.freq_base",
}
#: block tensors of mixture-of-experts files (llama.cpp: LLM_TENSOR_FFN_*_EXPS and the router)
EXPERT_TENSORS = ("ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "ffn_gate_up_exps",
                  "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp", "ffn_gate_inp_shexp", "exp_probs_b")
#: metadata (after ``<arch>.``) that changes the math where present, with what it is; refused
#: by name unless the architecture's config consumes it (``ModelConfig.handled``)
MATH_KEYS = {
    "expert_count": "mixture of experts",
    "attn_logit_softcapping": "attention logit soft-capping",
    "final_logit_softcapping": "final logit soft-capping",
    "attention.sliding_window": "sliding-window attention",
    "attention.layer_norm_epsilon": "LayerNorm (NKAT implements RMSNorm)",
    "attention.clamp_kqv": "clamped q/k/v",
    "attention.q_lora_rank": "multi-head latent attention",
    "attention.kv_lora_rank": "multi-head latent attention",
    "rope.dimension_sections": "multi-section rope (M-RoPE)",
    "logit_scale": "scaled logits",
    "embedding_scale": "scaled embeddings",
    "residual_scale": "scaled residuals",
    "attention.scale": "a custom attention scale",
    "rope.scaling.attn_factor": "a rope attention factor",
}
#: values of those keys that change nothing (written by converters as defaults)
NO_OP_VALUES = {"expert_count": 0, "attn_logit_softcapping": 0.0, "final_logit_softcapping": 0.0,
                "attention.sliding_window": 0, "logit_scale": 1.0, "embedding_scale": 1.0, "residual_scale": 1.0,
                "rope.scaling.attn_factor": 1.0}


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
    for name in ("rms_eps", "attn_scale", "embed_scale", "attn_softcap", "final_softcap"):
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value >= 0):
            raise ModelFormatError(f"model hyper-parameter {name} = {value!r} must be a finite number >= 0")
    if len(cfg.swa_layers) != cfg.n_layer:
        raise ModelFormatError(f"sliding-window pattern covers {len(cfg.swa_layers)} of {cfg.n_layer} layers")


def expected_shapes(cfg: ModelConfig, n_vocab_rows: int) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape (torch order, [out, in]) for every tensor this model reads: a file's
    tensor outside this set would be ignored, so ``check_unknown_tensors`` refuses it."""
    q, kv, d, ff = cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim, cfg.n_embd, cfg.n_ff
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (n_vocab_rows, d), "output.weight": (n_vocab_rows, d), "output_norm.weight": (d,)}
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        shapes.update({
            p + "attn_norm.weight": (d,), p + "ffn_norm.weight": (d,), p + "attn_q.weight": (q, d),
            p + "attn_k.weight": (kv, d), p + "attn_v.weight": (kv, d), p + "attn_output.weight": (d, q),
            p + "ffn_down.weight": (d, ff), p + "attn_q.bias": (q,), p + "attn_k.bias": (kv,),
            p + "attn_v.bias": (kv,), p + "attn_output.bias": (d,),
        })
        if cfg.post_norms:
            shapes.update({p + "post_attention_norm.weight": (d,), p + "post_ffw_norm.weight": (d,)})
        if cfg.qk_norm:
            shapes.update({p + "attn_q_norm.weight": (cfg.head_dim,), p + "attn_k_norm.weight": (cfg.head_dim,)})
        if cfg.n_expert:
            e, fe = cfg.n_expert, cfg.n_ff_expert
            del shapes[p + "ffn_down.weight"]
            shapes.update({p + "ffn_gate_inp.weight": (e, d), p + "ffn_gate_exps.weight": (e, fe, d),
                           p + "ffn_up_exps.weight": (e, fe, d), p + "ffn_down_exps.weight": (e, d, fe)})
        elif cfg.fused_gate_up:
            shapes.update({p + "ffn_up.weight": (2 * ff, d), p + "attn_qkv.weight": (q + 2 * kv, d)})
        else:
            shapes.update({p + "ffn_gate.weight": (ff, d), p + "ffn_up.weight": (ff, d)})
    for name in ("rope_factors_long", "rope_factors_short") if cfg.longrope else ("rope_freqs",):
        shapes[name + ".weight"] = (cfg.rope_dim // 2,)
    return shapes


def check_metadata(cfg: ModelConfig, meta: dict[str, Any]) -> None:
    """Refuse, by name, a key that would change the math and that this architecture does not read."""
    p = cfg.arch + "."
    for key, what in MATH_KEYS.items():
        value = meta.get(p + key)
        if value is None or key in cfg.handled or (key in NO_OP_VALUES and value == NO_OP_VALUES[key]):
            continue
        if key == "attention.sliding_window" and isinstance(value, int) and value >= cfg.context_length:
            continue  # a window as long as the context never cuts
        raise UnsupportedError(f"metadata {p + key} = {value!r} ({what}) is not supported for {cfg.arch!r} "
                               "files: refusing rather than running the model without it")


def check_unknown_tensors(cfg: ModelConfig, names: Any) -> None:
    """Refuse a file with a tensor the model would not read (unless listed in HARMLESS_TENSORS):
    an ignored tensor means wrong output, not a smaller model."""
    known = set(expected_shapes(cfg, 1))
    for name in sorted(names):
        if name in known or ".theta_" in name:  # θ factors: read by the loader (.nkat files)
            continue
        parts = name.split(".")
        base = parts[2] if len(parts) >= 3 and parts[0] == "blk" else parts[0]
        if base in HARMLESS_TENSORS:
            continue
        if base in EXPERT_TENSORS:
            raise UnsupportedError(f"tensor {name}: mixture-of-experts layers are not supported for "
                                   f"{cfg.arch!r} files" + ("" if cfg.n_expert else " without expert_count"))
        raise UnsupportedError(f"tensor {name} is not part of NKAT's {cfg.arch!r} model: refusing rather than "
                               "running without it")


def check_supported(cfg: ModelConfig, meta: dict[str, Any], tensors: Any) -> None:
    """What NKAT refuses before reading a weight (the loader, and the start-up probe that hands
    such files to Kobold.cpp): math-changing keys it does not read, tensors it would not use."""
    check_metadata(cfg, meta)
    check_unknown_tensors(cfg, tensors)


def check_tensors(cfg: ModelConfig, tensors: dict[str, Any], n_tokens: int) -> None:
    """The tensors the model reads have their expected shapes; the tokenizer's ids fit the
    embedding table."""
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
