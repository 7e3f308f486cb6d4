"""Architectures: one file each, a config function registered by GGUF architecture name."""

from __future__ import annotations

from typing import Any, Callable

from ..errors import UnsupportedError
from . import gemma3, llama, qwen2
from .config import ModelConfig
from .decoder import DecoderModel, WeightSource

ARCHITECTURES: dict[str, Callable[[dict[str, Any], int], ModelConfig]] = {
    "llama": llama.config,
    "qwen2": qwen2.config,
    "gemma3": gemma3.config,
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
