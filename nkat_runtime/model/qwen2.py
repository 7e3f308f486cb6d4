"""Qwen2: the LLaMA graph plus q/k/v biases and NEOX-style rope (rotating halves).
Reference: llama.cpp ``src/models/qwen2.cpp``."""

from __future__ import annotations

from typing import Any

from .config import ModelConfig, base_config


def config(meta: dict[str, Any], vocab_size: int) -> ModelConfig:
    cfg = base_config(meta, "qwen2", vocab_size)
    cfg.rope_neox = True
    cfg.qkv_bias = True
    cfg.act = "silu"
    return cfg
