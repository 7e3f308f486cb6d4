"""Plain floating-point tensor types: F32, F16, BF16 (one element per "block").

All three widenings to float32 are exact, so every finite or infinite bit pattern
(subnormals and signed zeros included) comes through as gguf-py gives it.
"""

from __future__ import annotations

import torch
from gguf.constants import GGMLQuantizationType

from .base import QuantHandler


class F32(QuantHandler, qtype=GGMLQuantizationType.F32):
    """4 bytes: a little-endian IEEE binary32."""

    def dequantize_into(self, blocks: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(blocks.contiguous().view(torch.float32))


class F16(QuantHandler, qtype=GGMLQuantizationType.F16):
    """2 bytes: a little-endian IEEE binary16."""

    def dequantize_into(self, blocks: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(blocks.contiguous().view(torch.float16))  # exact widening


class BF16(QuantHandler, qtype=GGMLQuantizationType.BF16):
    """2 bytes: the top half of a binary32 (gguf-py: ``int16 << 16`` viewed as float32)."""

    def dequantize_into(self, blocks: torch.Tensor, out: torch.Tensor) -> None:
        # torch widens bfloat16 by placing its 16 bits on top of 16 zero bits (scalar and
        # vector paths alike): the same bits as gguf-py's ``int16 << 16``.
        out.copy_(blocks.contiguous().view(torch.bfloat16))


class I8(QuantHandler, qtype=GGMLQuantizationType.I8):
    """1 byte: a signed integer (used by .nkat θ factors)."""

    def dequantize_into(self, blocks: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(blocks.contiguous().view(torch.int8))
