"""K-quants: super-blocks of 256 weights (QK_K) split into groups of 16 or 32.

Packing conventions shared by several types (``n`` = super-blocks):

- 2-bit codes: 32-byte chunk ``c`` of ``qs``, bit pair ``s`` of byte ``i`` -> weight
  ``128 c + 32 s + i``.
- 4-bit codes (Q4_K/Q5_K): 32-byte chunk ``c``, low nibble of byte ``i`` -> weight
  ``64 c + i``, high nibble -> ``64 c + 32 + i``.
- one high bit per weight (Q3_K ``hmask``, Q5_K ``qh``): bit ``s`` of byte ``i`` belongs
  to weight ``32 s + i``.

Every per-group scale is computed in float32 as ``d * scale`` first, then multiplied by the
codes (and the ``dmin * min`` term subtracted), the order gguf-py uses.
"""

from __future__ import annotations

import torch
from gguf.constants import GGMLQuantizationType

from .base import QuantHandler, Unpacked, f16_field, split_bits, unpack_scale_min_k4


def _two_bit_codes(qs: torch.Tensor) -> torch.Tensor:
    """``[n, 64]`` bytes -> ``[n, 256]`` 2-bit codes (128 weights per 32-byte chunk)."""
    n = qs.shape[0]
    return split_bits(qs.reshape(n, 2, 32), 2).reshape(n, 256)


def _four_bit_codes(qs: torch.Tensor) -> torch.Tensor:
    """``[n, 128]`` bytes -> ``[n, 256]`` nibbles (64 weights per 32-byte chunk)."""
    n = qs.shape[0]
    return split_bits(qs.reshape(n, 4, 32), 4).reshape(n, 256)


def _high_bits(h: torch.Tensor) -> torch.Tensor:
    """``[n, 32]`` bytes -> ``[n, 256]`` bits, bit ``s`` of byte ``i`` at ``32 s + i``."""
    return split_bits(h, 1).reshape(h.shape[0], 256)


class Q2_K(QuantHandler, qtype=GGMLQuantizationType.Q2_K):
    """84 bytes: scales[16] (low nibble scale, high nibble min) | qs[64] | d f16 | dmin f16.

    16 groups of 16: ``w = (d * sc) * q - (dmin * m)``, q in 0..3.
    """

    group_size = 16

    def unpack(self, blocks: torch.Tensor) -> Unpacked:
        scales = blocks[:, 0:16]
        d, dmin = f16_field(blocks, 80), f16_field(blocks, 82)
        dl = d * (scales & 0x0F).to(torch.float32)
        ml = dmin * (scales >> 4).to(torch.float32)
        return Unpacked(_two_bit_codes(blocks[:, 16:80]), dl, ml)


class Q3_K(QuantHandler, qtype=GGMLQuantizationType.Q3_K):
    """110 bytes: hmask[32] | qs[64] | scales[12] (16 x 6 bit) | d f16.

    16 groups of 16: ``w = (d * (sc - 32)) * q`` with ``q = low2 - (4 if hbit == 0 else 0)``;
    codes are stored offset by 4 (``low2 | hbit << 2``, 0..7).  Scale bytes 0-7 hold the low
    nibbles of scales 0-7 (low half) and 8-15 (high half); bytes 8-11 hold the top two bits,
    scale ``4 s + k`` in bits ``2 s`` of byte ``8 + k``.
    """

    group_size = 16
    code_offset = 4

    def unpack(self, blocks: torch.Tensor) -> Unpacked:
        n = blocks.shape[0]
        raw = blocks[:, 96:108]
        low = split_bits(raw[:, 0:8], 4).reshape(n, 16)
        high = split_bits(raw[:, 8:12], 2).reshape(n, 16)
        sc = (low | (high << 4)).to(torch.float32) - 32.0  # exact: small integers
        dl = f16_field(blocks, 108) * sc
        # hbit set -> q = low2, clear -> low2 - 4; i.e. (low2 | hbit << 2) - 4
        q = _two_bit_codes(blocks[:, 32:96]) | (_high_bits(blocks[:, 0:32]) << 2)
        return Unpacked(q, dl, None)


class Q4_K(QuantHandler, qtype=GGMLQuantizationType.Q4_K):
    """144 bytes: d f16 | dmin f16 | scales[12] (8 x 6-bit scale + min) | qs[128].

    8 groups of 32: ``w = (d * sc) * q - (dmin * m)``, q in 0..15.
    """

    group_size = 32

    def unpack(self, blocks: torch.Tensor) -> Unpacked:
        sc, mn = unpack_scale_min_k4(blocks[:, 4:16])
        dl = f16_field(blocks, 0) * sc.to(torch.float32)
        ml = f16_field(blocks, 2) * mn.to(torch.float32)
        return Unpacked(_four_bit_codes(blocks[:, 16:144]), dl, ml)


class Q5_K(QuantHandler, qtype=GGMLQuantizationType.Q5_K):
    """176 bytes: d f16 | dmin f16 | scales[12] | qh[32] | qs[128].

    As Q4_K with a fifth bit from ``qh``: ``q = nibble | hbit << 4`` in 0..31.
    """

    group_size = 32

    def unpack(self, blocks: torch.Tensor) -> Unpacked:
        sc, mn = unpack_scale_min_k4(blocks[:, 4:16])
        dl = f16_field(blocks, 0) * sc.to(torch.float32)
        ml = f16_field(blocks, 2) * mn.to(torch.float32)
        q = _four_bit_codes(blocks[:, 48:176]) | (_high_bits(blocks[:, 16:48]) << 4)
        return Unpacked(q, dl, ml)


class Q6_K(QuantHandler, qtype=GGMLQuantizationType.Q6_K):
    """210 bytes: ql[128] | qh[64] | scales int8[16] | d f16.

    Each 128-weight half ``h`` uses ``ql[64h:64h+64]`` (low nibbles -> weights 0..63, high
    nibbles -> 64..127) and ``qh[32h:32h+32]`` (bit pair ``s`` of byte ``i`` -> weight
    ``32 s + i``).  16 groups of 16: ``w = (d * sc) * (q - 32)``, q in 0..63.
    """

    group_size = 16
    code_offset = 32

    def unpack(self, blocks: torch.Tensor) -> Unpacked:
        n = blocks.shape[0]
        ql = split_bits(blocks[:, 0:128].reshape(n, 2, 64), 4).reshape(n, 256)
        qh = split_bits(blocks[:, 128:192].reshape(n, 2, 32), 2).reshape(n, 256)
        sc = blocks[:, 192:208].view(torch.int8).to(torch.float32)
        return Unpacked(ql | (qh << 4), f16_field(blocks, 208) * sc, None)
