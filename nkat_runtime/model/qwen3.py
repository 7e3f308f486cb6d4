"""Qwen3 (dense): the LLaMA graph with NEOX-style rope, RMS-normed q and k per head (before
rope), no biases, head size given by ``key_length`` (not n_embd / n_head). Reference: llama.cpp
``src/models/qwen3.cpp``."""

from __future__ import annotations

from typing import Any

from .config import ModelConfig, base_config


def config(meta: dict[str, Any], vocab_size: int) -> ModelConfig:
    cfg = base_config(meta, "qwen3", vocab_size)
    cfg.rope_neox = True
    cfg.qk_norm = True
    cfg.act = "silu"
    return cfg
