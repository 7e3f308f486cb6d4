"""The original GGML block formats, 32 weights per block: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

4-bit codes are stored two per byte: byte ``i`` of ``qs`` holds weight ``i`` in its low
nibble and weight ``i + 16`` in its high nibble.  The 5-bit types keep the fifth bit of
weight ``i`` in bit ``i`` of a little-endian uint32 ``qh``.  ``d`` and ``m`` are float16.
"""

from __future__ import annotations

import torch
from gguf.constants import GGMLQuantizationType

from .base import QuantHandler, Unpacked, f16_field, nibbles


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """``[n, 4]`` bytes of a little-endian uint32 -> ``[n, 32]`` bits, bit ``i`` at ``i``."""
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)
    return ((qh.unsqueeze(-1) >> shifts) & 1).reshape(qh.shape[0], 32)


class Q4_0(QuantHandler, qtype=GGMLQuantizationType.Q4_0):
    """18 bytes: d f16 | qs[16].  ``w = d * (q - 8)``."""

    group_size = 32
    code_offset = 8

    def unpack(self, blocks: torch.Tensor) -> Unpacked:
        return Unpacked(nibbles(blocks[:, 2:18]), f16_field(blocks, 0), None)


class Q4_1(QuantHandler, qtype=GGMLQuantizationType.Q4_1):
    """20 bytes: d f16 | m f16 | qs[16].  ``w = d * q + m`` (``mins`` holds ``-m``)."""

    group_size = 32

    def unpack(self, blocks: torch.Tensor) -> Unpacked:
        # x - (-m) is the same IEEE operation as x + m, so the shared formula stays exact.
        return Unpacked(nibbles(blocks[:, 4:20]), f16_field(blocks, 0), -f16_field(blocks, 2))


class Q5_0(QuantHandler, qtype=GGMLQuantizationType.Q5_0):
    """22 bytes: d f16 | qh u32 | qs[16].  ``w = d * (q - 16)``, q = nibble | bit << 4."""

    group_size = 32
    code_offset = 16

    def unpack(self, blocks: torch.Tensor) -> Unpacked:
        q = nibbles(blocks[:, 6:22]) | (_fifth_bits(blocks[:, 2:6]) << 4)
        return Unpacked(q, f16_field(blocks, 0), None)


class Q5_1(QuantHandler, qtype=GGMLQuantizationType.Q5_1):
    """24 bytes: d f16 | m f16 | qh u32 | qs[16].  ``w = d * q + m`` (``mins`` holds ``-m``)."""

    group_size = 32

    def unpack(self, blocks: torch.Tensor) -> Unpacked:
        q = nibbles(blocks[:, 8:24]) | (_fifth_bits(blocks[:, 4:8]) << 4)
        return Unpacked(q, f16_field(blocks, 0), -f16_field(blocks, 2))


class Q8_0(QuantHandler, qtype=GGMLQuantizationType.Q8_0):
    """34 bytes: d f16 | qs int8[32].  ``w = q * d`` (codes are int8)."""

    group_size = 32

    def unpack(self, blocks: torch.Tensor) -> Unpacked:
        return Unpacked(blocks[:, 2:34].view(torch.int8), f16_field(blocks, 0), None)
