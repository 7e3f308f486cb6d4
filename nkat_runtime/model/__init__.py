"""Architectures: one file each, a config function registered by GGUF architecture name."""

from __future__ import annotations

from typing import Any, Callable

from ..errors import UnsupportedError
from . import gemma2, gemma3, llama, phi3, qwen2, qwen3, qwen3moe
from .config import ModelConfig
from .decoder import DecoderModel, WeightSource

ARCHITECTURES: dict[str, Callable[[dict[str, Any], int], ModelConfig]] = {
    "llama": llama.config,
    "qwen2": qwen2.config,
    "qwen3": qwen3.config,
    "qwen3moe": qwen3moe.config,
    "gemma2": gemma2.config,
    "gemma3": gemma3.config,
    "phi3": phi3.config,
}


def config_for(arch: str, meta: dict[str, Any], vocab_size: int) -> ModelConfig:
    try:
        make = ARCHITECTURES[arch]
    except KeyError:
        raise UnsupportedError(
            f"architecture {arch!r} is not supported (supported: {', '.join(sorted(ARCHITECTURES))})"
        ) from None
    return make(meta, vocab_size)


__all__ = ["ARCHITECTURES", "DecoderModel", "ModelConfig", "WeightSource", "config_for"]
