"""Gemma 2: Gemma 3's layout without q/k norms, plus soft-capping of the attention scores
(``attn_logit_softcapping``) and of the final logits (``final_logit_softcapping``); every other
layer (the even ones) attends over a sliding window, all with one rope base. The scale is
1/sqrt(key_length), except for the 27B model (46 layers): 1/sqrt(n_embd / n_head).
Reference: llama.cpp ``src/models/gemma2-iswa.cpp`` and ``llama-model.cpp`` (LLM_ARCH_GEMMA2)."""

from __future__ import annotations

import math
from typing import Any

from .config import ModelConfig, _float, _int, base_config

SWA_PATTERN = 2  # llama.cpp: hparams.set_swa_pattern(2)
LAYERS_27B = 46


def config(meta: dict[str, Any], vocab_size: int) -> ModelConfig:
    cfg = base_config(meta, "gemma2", vocab_size)
    cfg.rope_neox = True
    cfg.post_norms = True
    cfg.act = "gelu_tanh"
    cfg.embed_scale = math.sqrt(cfg.n_embd)
    cfg.sliding_window = _int(meta, "gemma2.attention.sliding_window", 4096)
    cfg.swa_layers = [cfg.sliding_window > 0 and i % SWA_PATTERN < SWA_PATTERN - 1 for i in range(cfg.n_layer)]
    cfg.rope_base_swa = cfg.rope_base
    cfg.attn_softcap = _float(meta, "gemma2.attn_logit_softcapping", 50.0)
    cfg.final_softcap = _float(meta, "gemma2.final_logit_softcapping", 30.0)
    per_head = cfg.n_embd // cfg.n_head if cfg.n_layer == LAYERS_27B else cfg.head_dim
    cfg.attn_scale = per_head**-0.5
    cfg.handled = cfg.handled | {"attention.sliding_window", "attn_logit_softcapping", "final_logit_softcapping"}
    return cfg
