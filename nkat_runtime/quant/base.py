"""Registry of GGML block-format handlers, plus byte-level helpers shared by them.

A handler turns ``blocks`` (uint8 ``[n_blocks, type_size]``, the bytes of one block per row,
exactly as stored in the GGUF file) into float32 ``[n_blocks, block_size]``.  Every handler
reproduces gguf-py's numpy dequantisation (``gguf/quants.py``) bit for bit: the same float32
operations in the same order.  Multi-byte fields are little-endian; ``Tensor.view(dtype)``
reads them in native order, which is little-endian on every platform torch ships for (gguf-py
does the same with ``ndarray.view``).

Subclasses register themselves by naming their type::

    class Q8_0(QuantHandler, qtype=GGMLQuantizationType.Q8_0): ...
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

_REGISTRY: dict[int, "QuantHandler"] = {}


class Unpacked(NamedTuple):
    """Integer codes and per-group float32 parameters of a block of quantised weights.

    For a handler with ``group_size`` G and ``code_offset`` o, element ``j`` of block ``b`` is::

        w[b, j] = scales[b, j // G] * (codes[b, j] - o) - mins[b, j // G]    # mins may be None

    evaluated in float32 in exactly that order (``codes - o`` is exact), which is also how the
    handler's ``dequantize_into`` computes it.
    """

    codes: torch.Tensor  # uint8 (int8 for Q8_0) [n_blocks, block_size]
    scales: torch.Tensor  # float32 [n_blocks, block_size // group_size]
    mins: torch.Tensor | None  # float32, same shape as scales; None for symmetric types


class QuantHandler:
    """One GGML tensor type: its block geometry and how to dequantise whole blocks.

    Handlers are stateless; the registry keeps one instance per type.  Quantised types
    implement :meth:`unpack` and inherit :meth:`dequantize_into`;
    plain float types override :meth:`dequantize_into` instead.
    """

    qtype: ClassVar[int]
    block_size: ClassVar[int]  # elements per block
    type_size: ClassVar[int]  # bytes per block
    group_size: ClassVar[int] = 0  # elements sharing one scale/min (quantised types)
    code_offset: ClassVar[int] = 0  # subtracted from the unsigned codes before scaling

    def __init_subclass__(cls, qtype: GGMLQuantizationType | None = None, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if qtype is None:  # an abstract intermediate class
            return
        qtype = GGMLQuantizationType(qtype)
        if int(qtype) in _REGISTRY:
            raise RuntimeError(f"a handler for {qtype.name} is already registered")
        cls.qtype = int(qtype)
        cls.block_size, cls.type_size = GGML_QUANT_SIZES[qtype]
        _REGISTRY[int(qtype)] = cls()

    @property
    def name(self) -> str:
        return GGMLQuantizationType(self.qtype).name

    def unpack(self, blocks: torch.Tensor) -> Unpacked:
        """Codes and per-group scales/mins of ``blocks`` (see :class:`Unpacked`)."""
        raise NotImplementedError(f"{self.name} has no integer-code form")

    def dequantize_into(self, blocks: torch.Tensor, out: torch.Tensor) -> None:
        """uint8 ``[n, type_size]`` blocks dequantised, bit-exact with gguf-py, into ``out`` (contiguous
        float32 ``[n, block_size]``).

        In place: codes -> float (exact), ``- code_offset`` (exact), ``* scale`` (one float32
        rounding), ``- min`` (one more).  Separate ops, so nothing is fused into an FMA.
        """
        codes, scales, mins = self.unpack(blocks)
        out.copy_(codes)
        if self.code_offset:
            out.sub_(float(self.code_offset))
        groups = out.view(out.shape[0], -1, self.group_size)
        groups.mul_(scales.unsqueeze(-1))
        if mins is not None:
            groups.sub_(mins.unsqueeze(-1))


def registry() -> dict[int, QuantHandler]:
    """The registered handlers, by type id (a copy)."""
    return dict(_REGISTRY)


def get_handler(qtype: int) -> QuantHandler | None:
    """The handler for ``qtype``, or None when there is none."""
    return _REGISTRY.get(int(qtype))


# --- byte-level helpers -------------------------------------------------------------------


def f16_field(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The little-endian float16 at byte ``offset`` of every block, as float32 ``[n, 1]``.

    float16 -> float32 is exact, as numpy's ``view(np.float16).astype(np.float32)``.
    """
    if offset % 2 == 0:
        try:  # reinterpret the whole block as halves: one strided read, no byte copy
            half = blocks.view(torch.float16)[:, offset // 2 : offset // 2 + 1]
            return half.to(torch.float32)
        except RuntimeError:  # odd row stride or storage offset: fall through
            pass
    return blocks[:, offset : offset + 2].contiguous().view(torch.float16).to(torch.float32)


def nibbles(qs: torch.Tensor) -> torch.Tensor:
    """``[n, k]`` bytes -> ``[n, 2k]`` codes: all low nibbles, then all high nibbles."""
    k = qs.shape[-1]
    out = torch.empty((*qs.shape[:-1], 2 * k), dtype=torch.uint8, device=qs.device)
    torch.bitwise_and(qs, 0x0F, out=out[..., :k])
    torch.bitwise_right_shift(qs, 4, out=out[..., k:])
    return out


def split_bits(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``[..., k]`` bytes -> ``[..., 8 // bits, k]``: field ``s`` is ``(x >> bits*s) & mask``.

    The usual GGML interleave: the first ``k`` outputs are bits 0.., the next ``k`` the
    following field, and so on, once the last two dims are flattened.
    """
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=x.device)
    mask = (1 << bits) - 1
    return (x.unsqueeze(-2) >> shifts.view(-1, 1)) & mask


def unpack_scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 scale bytes of Q4_K / Q5_K -> (scale, min), uint8 ``[n, 8]`` 6-bit each.

    Bytes 0-3 hold the low 6 bits of scales 0-3 (top 2 bits: high bits of scales 4-7),
    bytes 4-7 the same for mins, bytes 8-11 the low nibbles of scales 4-7 and (high
    nibble) mins 4-7.
    """
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return sc, mn
