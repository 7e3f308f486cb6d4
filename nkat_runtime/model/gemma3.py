"""Gemma 3 (text): embeddings scaled by √n_embd, GGUF norms used as stored (they hold 1+w),
RMS-normed q/k, pre- and post-norms around attention and FFN, GELU(tanh)-gated FFN,
sliding-window attention on local layers (every ``sliding_window_pattern``-th layer is
global) with rope base 10,000 there, tied output. Reference: llama.cpp
``src/models/gemma3.cpp`` and ``llama-model.cpp`` (LLM_ARCH_GEMMA3 hparams)."""

from __future__ import annotations

import math
from typing import Any

from .config import ModelConfig, _float, _int, base_config

DEFAULT_SWA_PATTERN = 6  # llama.cpp: hparams.set_swa_pattern(6)
DEFAULT_LOCAL_ROPE_BASE = 10_000.0


def config(meta: dict[str, Any], vocab_size: int) -> ModelConfig:
    cfg = base_config(meta, "gemma3", vocab_size)
    cfg.rope_neox = True
    cfg.qk_norm = True
    cfg.post_norms = True
    cfg.act = "gelu_tanh"
    cfg.embed_scale = math.sqrt(cfg.n_embd)
    cfg.handled = frozenset({"attention.sliding_window"})
    cfg.sliding_window = _int(meta, "gemma3.attention.sliding_window", 0)
    pattern = _int(meta, "gemma3.attention.sliding_window_pattern", DEFAULT_SWA_PATTERN)
    # a layer is local (sliding window) unless it is the last of each group of `pattern`
    cfg.swa_layers = [cfg.sliding_window > 0 and pattern > 0 and (i % pattern) < pattern - 1 for i in range(cfg.n_layer)]
    # local layers: their own base and no rope scaling (llama.cpp: rope_freq_*_train_swa)
    cfg.rope_base_swa = _float(meta, "gemma3.rope.freq_base_swa", DEFAULT_LOCAL_ROPE_BASE)
    # llama.cpp: 1/sqrt(head_dim) except for the 27B (n_embd/n_head); the key_length is the head size
    cfg.attn_scale = cfg.head_dim**-0.5
    return cfg
