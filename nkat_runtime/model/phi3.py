"""Phi-3 / Phi-4 (``phi3``): the LLaMA graph with NEOX rope, q/k/v fused in one ``attn_qkv``
tensor (or separate), gate and up fused in ``ffn_up`` (gate rows first), an untied head, and
"longrope" scaling: frequency factors from ``rope_factors_long`` when the context is longer than
the original one, else ``rope_factors_short``, with q and k scaled by ``rope.scaling.attn_factor``.
As llama.cpp does, the sliding window some Phi-3 files declare is not applied (llama.cpp:
"Phi SWA is currently disabled"); a warning says so. Reference: llama.cpp ``src/models/phi3.cpp``."""

from __future__ import annotations

import logging
from typing import Any

from .config import ModelConfig, base_config

log = logging.getLogger(__name__)


def config(meta: dict[str, Any], vocab_size: int) -> ModelConfig:
    cfg = base_config(meta, "phi3", vocab_size, longrope=True)
    cfg.rope_neox = True
    cfg.act = "silu"
    cfg.fused_gate_up = True
    # longrope: the file says so by its rope_factors tensors (llama.cpp's converter writes no type);
    # q and k are scaled by rope.scaling.attn_factor (cfg.rope_attn_factor)
    cfg.longrope = True
    window = meta.get("phi3.attention.sliding_window")
    if isinstance(window, int) and 0 < window < cfg.context_length:
        log.warning("phi3: the file's sliding window (%d) is not applied, as in llama.cpp", window)
    cfg.handled = cfg.handled | {"attention.sliding_window", "rope.scaling.attn_factor"}
    return cfg
