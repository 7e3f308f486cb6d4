"""LLaMA (and Mistral- and Mixtral-style files that use ``llama``): RMSNorm, rope on adjacent
pairs (llama.cpp's converter permutes Q/K for it), GQA, SwiGLU, or a mixture of SwiGLU experts
where the file has ``expert_count``. Reference: llama.cpp ``src/models/llama.cpp``."""

from __future__ import annotations

from typing import Any

from .config import ModelConfig, base_config


def config(meta: dict[str, Any], vocab_size: int) -> ModelConfig:
    cfg = base_config(meta, "llama", vocab_size, experts=True)
    cfg.rope_neox = False
    cfg.act = "silu"
    return cfg
