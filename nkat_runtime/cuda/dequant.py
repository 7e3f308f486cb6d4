"""GGUF blocks dequantised inside Triton kernels, from the file's own bytes.

A weight is held as the file stores it: uint8 ``[N, row_bytes]``, each row the blocks of one
output feature (``row_bytes = K / block_size × type_size``). ``weights(w, rows, cols, ...)``
returns the float32 tile ``W[rows, cols]`` for index vectors ``rows`` [BN] and ``cols`` [BK]:
each element gathers its own bytes (the block's scale fields and its code bits) with the formulas
of ggml's ``dequantize_row_*`` (``ggml-quants.c``), so a kernel never needs a repacked copy and
VRAM for weights equals the file's bytes. Within a tile, neighbouring elements read neighbouring
bytes of the same blocks, which the GPU's caches serve.

The types and their byte layouts (offsets within one block):

======  ===  =====  =======================================================================
type    QK   bytes  fields
======  ===  =====  =======================================================================
Q4_0    32   18     d f16 @0, qs[16] @2 (weight j < 16: low nibble of qs[j], else high of qs[j-16])
Q4_1    32   20     d @0, m @2, qs[16] @4
Q5_0    32   22     d @0, qh u32 @2 (bit j: weight j's fifth bit), qs[16] @6
Q5_1    32   24     d @0, m @2, qh @4, qs @8
Q8_0    32   34     d @0, qs int8[32] @2
Q2_K    256  84     scales[16] @0 (low nibble scale, high min), qs[64] @16, d @80, dmin @82
Q3_K    256  110    hmask[32] @0, qs[64] @32, scales[12] @96 (16 six-bit), d @108
Q4_K    256  144    d @0, dmin @2, scales[12] @4 (8 six-bit scales and mins), qs[128] @16
Q5_K    256  176    d @0, dmin @2, scales[12] @4, qh[32] @16, qs[128] @48
Q6_K    256  210    ql[128] @0, qh[64] @128, scales int8[16] @192, d @208
======  ===  =====  =======================================================================
"""

from __future__ import annotations

import triton
import triton.language as tl
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as T

Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = int(T.Q4_0), int(T.Q4_1), int(T.Q5_0), int(T.Q5_1), int(T.Q8_0)
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = int(T.Q2_K), int(T.Q3_K), int(T.Q4_K), int(T.Q5_K), int(T.Q6_K)
#: the types the kernels read, with (weights per block, bytes per block)
TYPES: dict[int, tuple[int, int]] = {t: GGML_QUANT_SIZES[T(t)] for t in
                                     (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)}


@triton.jit
def _u8(p, mask):
    return tl.load(p, mask=mask, other=0).to(tl.int32)


@triton.jit
def _f16(p, mask):
    """The little-endian float16 at byte pointers ``p``, as float32."""
    lo = tl.load(p, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(p + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _scale_min_k4(sc, j, mask):
    """Q4_K/Q5_K: the six-bit scale and min of sub-block ``j`` (0..7) from the 12 bytes at ``sc``
    (ggml's ``get_scale_min_k4``)."""
    low = j < 4
    a = _u8(sc + j, mask)  # j < 4: scale's byte
    b = _u8(sc + j + 4, mask)  # j < 4: min's byte; j >= 4: low nibbles of both
    c = _u8(sc + j - 4, mask & (j >= 4))  # j >= 4: the two high bits of both
    scale = tl.where(low, a & 63, (b & 15) | ((c >> 6) << 4))
    mn = tl.where(low, b & 63, (b >> 4) | ((a >> 6) << 4))
    return scale.to(tl.float32), mn.to(tl.float32)


@triton.jit
def weights(w, rows, cols, row_bytes, n_rows, n_cols, QTYPE: tl.constexpr, QK: tl.constexpr, TS: tl.constexpr):
    """float32 W[rows, cols] (``rows`` [BN], ``cols`` [BK]); 0 outside ``n_rows`` × ``n_cols``."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    blk = w + rows[:, None].to(tl.int64) * row_bytes + (cols[None, :] // QK) * TS  # each element's block
    j = cols[None, :] % QK  # its index in the block
    if QTYPE == 8:  # Q8_0
        q = tl.load(blk + 2 + j, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        return _f16(blk, mask) * q
    elif QTYPE == 2 or QTYPE == 3 or QTYPE == 6 or QTYPE == 7:  # Q4_0, Q4_1, Q5_0, Q5_1
        qs_at: tl.constexpr = 2 if QTYPE == 2 else (4 if QTYPE == 3 else (6 if QTYPE == 6 else 8))
        byte = _u8(blk + qs_at + (j % 16), mask)
        q = tl.where(j < 16, byte & 15, byte >> 4)
        if QTYPE == 6 or QTYPE == 7:
            qh_at: tl.constexpr = 2 if QTYPE == 6 else 4
            q = q | (((_u8(blk + qh_at + j // 8, mask) >> (j % 8)) & 1) << 4)
        d = _f16(blk, mask)
        if QTYPE == 2:
            return d * (q - 8).to(tl.float32)
        elif QTYPE == 6:
            return d * (q - 16).to(tl.float32)
        else:
            return d * q.to(tl.float32) + _f16(blk + 2, mask)
    elif QTYPE == 12 or QTYPE == 13:  # Q4_K, Q5_K
        g = j // 64  # 64 weights share a byte run of 32: low nibbles first, then high
        sub = j // 32
        qs_at: tl.constexpr = 16 if QTYPE == 12 else 48
        byte = _u8(blk + qs_at + 32 * g + (j % 32), mask)
        q = tl.where((j % 64) < 32, byte & 15, byte >> 4)
        if QTYPE == 13:
            q = q | (((_u8(blk + 16 + (j % 32), mask) >> sub) & 1) << 4)
        scale, mn = _scale_min_k4(blk + 4, sub, mask)
        return _f16(blk, mask) * scale * q.to(tl.float32) - _f16(blk + 2, mask) * mn
    elif QTYPE == 14:  # Q6_K
        h = j // 128  # half
        t = (j % 128) // 32  # quarter of the half
        lane = j % 32
        ql = _u8(blk + 64 * h + lane + 32 * (t & 1), mask)
        low = tl.where(t < 2, ql & 15, ql >> 4)
        high = (_u8(blk + 128 + 32 * h + lane, mask) >> (2 * t)) & 3
        sc = tl.load(blk + 192 + 8 * h + lane // 16 + 2 * t, mask=mask, other=0).to(tl.int8, bitcast=True)
        return _f16(blk + 208, mask) * sc.to(tl.float32) * ((low | (high << 4)) - 32).to(tl.float32)
    elif QTYPE == 10:  # Q2_K
        h = j // 128
        s = (j % 128) // 32  # the bit pair
        g = (j % 32) // 16
        lane = j % 16
        q = (_u8(blk + 16 + 32 * h + 16 * g + lane, mask) >> (2 * s)) & 3
        sc = _u8(blk + 8 * h + 2 * s + g, mask)
        return (_f16(blk + 80, mask) * (sc & 15).to(tl.float32) * q.to(tl.float32)
                - _f16(blk + 82, mask) * (sc >> 4).to(tl.float32))
    else:  # Q3_K (11)
        h = j // 128
        s = (j % 128) // 32
        g = (j % 32) // 16
        lane = j % 16
        low = (_u8(blk + 32 + 32 * h + 16 * g + lane, mask) >> (2 * s)) & 3
        hbit = (_u8(blk + 16 * g + lane, mask) >> (4 * h + s)) & 1
        i = 8 * h + 2 * s + g  # the scale's index, 0..15
        lo4 = tl.where(i < 8, _u8(blk + 96 + i, mask & (i < 8)) & 15, _u8(blk + 96 + i - 8, mask & (i >= 8)) >> 4)
        hi2 = (_u8(blk + 104 + i % 4, mask) >> (2 * (i // 4))) & 3
        sc = (lo4 | (hi2 << 4)) - 32
        q = low - tl.where(hbit != 0, 0, 4)
        return _f16(blk + 108, mask) * sc.to(tl.float32) * q.to(tl.float32)
