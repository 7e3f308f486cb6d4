"""GGUF blocks held as planes: each field of a block type in a tensor of its own.

A GGUF tensor stores its blocks as structs (Q6_K: ``ql[128] qh[64] scales[16] d``, 210
bytes per 256 weights). ``split`` turns a chunk of rows ``[N, NB, type_size]`` into one tensor
per field, ``[N, NB, …]``, in an order kernels read with contiguous vector loads, and
``weights`` is the dequantisation as one expression of torch ops over the planes, shaped
``[N, NB, *INNER[type]]`` (flattening ``INNER`` gives a block's weights in file order),
computed in float32 in gguf-py's order: bit-exact. The kernels (``model/fused.py``) fuse it
into their reduction, so a product reads the planes and never writes a weight out.

Two forms, chosen by measured speed (``docs/fast-path.md``):

- **byte codes** (Q4_*, Q5_*, Q6_K, Q8_0): every code widened to one int8 (``code - offset``,
  exact), the scale fields as in the file (f16 ``d``/``dmin``, the int8 or 6-bit sub-block
  scales). One load and one convert per weight: 11–15 G weights/s for one row on two EPYC
  cores, against 5 G/s when the kernel unpacked Q6_K's bits. Costs bytes: Q6_K 1.07 B/weight
  against the file's 0.82.
- **packed bits** (Q2_K, Q3_K): the file's own bits, unpacked in the kernel; these types are
  for small machines, where memory matters more than speed.

Q6_K always takes this form. The 4-, 5- and 8-bit types go to torch's int4 kernel
(``model/packed.py``: faster, at 0.625 or 1.25 B/weight); their byte-code form here serves
the shapes that kernel refuses (rows not a multiple of 16) and builds without it.
"""

from __future__ import annotations

import torch
from gguf.constants import GGMLQuantizationType as T

from . import handler
from .base import split_bits, unpack_scale_min_k4

Planes = dict[str, torch.Tensor]

# plain ints: the functions below are traced by torch.compile, which handles ints, not enums
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = int(T.Q4_0), int(T.Q4_1), int(T.Q5_0), int(T.Q5_1), int(T.Q8_0)
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = int(T.Q2_K), int(T.Q3_K), int(T.Q4_K), int(T.Q5_K), int(T.Q6_K)
LEGACY = (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0)

#: types whose codes are widened to int8, and their group size (weights per scale); the 4-bit
#: ones only for shapes torch's int4 kernel refuses
BYTE_CODES: dict[int, int] = {Q4_0: 32, Q4_1: 32, Q5_0: 32, Q5_1: 32, Q8_0: 32, Q4_K: 32, Q5_K: 32, Q6_K: 16}
#: per type: the shape of one block's weights as ``weights`` returns them
INNER: dict[int, tuple[int, ...]] = {
    **{t: (1 if t in LEGACY else 256 // g, g) for t, g in BYTE_CODES.items()},
    Q3_K: (2, 4, 2, 16),  # chunk c, bit pair s, group half g, i: weight 128c + 32s + 16g + i
    Q2_K: (2, 4, 2, 16),
}
TYPES = frozenset(INNER)


def _field(blocks: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    return blocks[..., start:stop].contiguous()


def _f16(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    return _field(blocks, offset, offset + 2).view(torch.float16)[..., 0]


def _byte_codes(blocks: torch.Tensor, qtype: int) -> torch.Tensor:
    """int8 ``code - offset`` of every weight, ``[N, NB, *INNER]`` (exact: the codes fit)."""
    n, nb, size = blocks.shape
    h = handler(qtype)
    codes = h.unpack(blocks.reshape(n * nb, size)).codes
    if codes.dtype != torch.int8:
        codes = (codes.to(torch.int16) - h.code_offset).to(torch.int8)
    return codes.reshape(n, nb, *INNER[qtype])


def split(blocks: torch.Tensor, qtype: int) -> Planes:
    """uint8 blocks ``[N, NB, type_size]`` (the file's bytes) → the type's planes."""
    qtype = int(qtype)
    n, nb = blocks.shape[:2]
    if qtype in (Q8_0, Q5_0, Q4_0):
        return {"codes": _byte_codes(blocks, qtype), "d": _f16(blocks, 0)}
    if qtype in (Q5_1, Q4_1):
        return {"codes": _byte_codes(blocks, qtype), "d": _f16(blocks, 0), "m": _f16(blocks, 2)}
    if qtype == Q6_K:
        return {"codes": _byte_codes(blocks, qtype), "sc": _field(blocks, 192, 208).view(torch.int8),
                "d": _f16(blocks, 208)}
    if qtype in (Q5_K, Q4_K):
        sc, mn = unpack_scale_min_k4(blocks[..., 4:16].reshape(n * nb, 12))
        return {"codes": _byte_codes(blocks, qtype), "sc": sc.view(n, nb, 8), "mn": mn.view(n, nb, 8),
                "d": _f16(blocks, 0), "dmin": _f16(blocks, 2)}
    if qtype == Q3_K:
        raw = blocks[..., 96:108].reshape(n * nb, 12)
        low = split_bits(raw[:, 0:8], 4).reshape(n, nb, 16)
        high = split_bits(raw[:, 8:12], 2).reshape(n, nb, 16)
        sc = ((low | (high << 4)).to(torch.int16) - 32).to(torch.int8)
        return {"hmask": _field(blocks, 0, 32), "qs": _field(blocks, 32, 96), "sc": sc, "d": _f16(blocks, 108)}
    if qtype == Q2_K:
        return {"scales": _field(blocks, 0, 16), "qs": _field(blocks, 16, 80),
                "d": _f16(blocks, 80), "dmin": _f16(blocks, 82)}
    raise ValueError(f"no plane layout for type {qtype}")


def nbytes(planes: Planes) -> int:
    """Bytes the planes hold (what one pass over the weight reads)."""
    return sum(t.numel() * t.element_size() for t in planes.values())


def _shifts(values: list[int], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=device).view(shape)


def weights(planes: Planes, qtype: int) -> torch.Tensor:
    """The float32 weights ``[N, NB, *INNER[qtype]]``, bit-exact with gguf-py's dequantisation."""
    qtype = int(qtype)
    if qtype in BYTE_CODES:
        q = planes["codes"].float()
        d = planes["d"].float()[..., None]
        if qtype in (Q8_0, Q5_0, Q4_0):
            return q * d[..., None]
        if qtype in (Q5_1, Q4_1):  # w = d·q + m
            return q * d[..., None] + planes["m"].float()[..., None, None]
        scale = d * planes["sc"].float()
        if qtype == Q6_K:
            return q * scale[..., None]
        low = planes["dmin"].float()[..., None] * planes["mn"].float()  # Q4_K, Q5_K: w = (d·sc)·q − dmin·m
        return q * scale[..., None] - low[..., None]
    if qtype in (Q3_K, Q2_K):
        qs = planes["qs"]
        n, nb = qs.shape[:2]
        dev = qs.device
        low = (qs.view(n, nb, 2, 1, 2, 16) >> _shifts([0, 2, 4, 6], (1, 4, 1, 1), dev)) & 3
        if qtype == Q2_K:
            sc = planes["scales"]
            dl = planes["d"].float()[..., None] * (sc & 15).float()
            ml = planes["dmin"].float()[..., None] * (sc >> 4).float()
            return dl.view(n, nb, 2, 4, 2, 1) * low.float() - ml.view(n, nb, 2, 4, 2, 1)
        # the high bit of weight 32 s' + i is bit s' of hmask[i]; here s' = 4c + s
        hm = planes["hmask"].view(n, nb, 1, 1, 2, 16)
        hbit = (hm >> torch.arange(8, dtype=torch.uint8, device=dev).view(2, 4, 1, 1)) & 1
        q = (low | (hbit << 2)).float() - 4.0
        dl = planes["d"].float()[..., None] * planes["sc"].float()
        return dl.view(n, nb, 2, 4, 2, 1) * q
    raise ValueError(f"no plane layout for type {qtype}")
