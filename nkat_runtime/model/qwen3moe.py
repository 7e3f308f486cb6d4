"""Qwen3-MoE: Qwen3's attention (q/k norm, NEOX rope, no biases) with a mixture-of-experts FFN
in every layer (softmax gating, top-k weights renormalised, as llama.cpp does for it; Qwen's
own models set ``norm_topk_prob``). Reference: llama.cpp ``src/models/qwen3moe.cpp``."""

from __future__ import annotations

from typing import Any

from ..errors import ModelFormatError
from .config import ModelConfig, base_config


def config(meta: dict[str, Any], vocab_size: int) -> ModelConfig:
    cfg = base_config(meta, "qwen3moe", vocab_size, experts=True)
    if not cfg.n_expert:
        raise ModelFormatError("qwen3moe file without qwen3moe.expert_count")
    cfg.rope_neox = True
    cfg.qk_norm = True
    cfg.act = "silu"
    return cfg
