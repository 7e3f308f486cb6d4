"""Vectorised torch dequantisation of GGML tensor types, bit-exact with gguf-py.

``dequantize(raw, qtype, shape)`` takes a tensor's bytes as stored in a GGUF file and returns
float32 of ``shape`` (numpy/torch order: the last dim is the row, GGML's ``ne[0]``).  Work is
done ``CHUNK_ELEMENTS`` outputs at a time into one preallocated tensor, so the temporaries
stay small whatever the tensor's size.

Supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import ModelFormatError, UnsupportedError
from . import float_types, kquants, legacy  # noqa: F401  (importing registers the handlers)
from .base import QuantHandler, Unpacked, get_handler, registry

__all__ = [
    "CHUNK_ELEMENTS",
    "SUPPORTED_TYPES",
    "QuantHandler",
    "Unpacked",
    "block_info",
    "dequantize",
    "handler",
    "tensor_nbytes",
    "type_name",
]

#: Output elements dequantised per step (16 MiB of float32).
CHUNK_ELEMENTS = 1 << 22

SUPPORTED_TYPES: frozenset[int] = frozenset(registry())


def type_name(qtype: int) -> str:
    """``GGMLQuantizationType`` name of ``qtype`` (e.g. ``"Q4_K"``), or ``"type <n>"`` if unknown."""
    try:
        return GGMLQuantizationType(int(qtype)).name
    except ValueError:
        return f"type {int(qtype)}"


def _unsupported(qtype: int) -> UnsupportedError:
    names = ", ".join(type_name(t) for t in sorted(SUPPORTED_TYPES))
    return UnsupportedError(f"tensor type {type_name(qtype)} is not supported (supported: {names})")


def handler(qtype: int) -> QuantHandler:
    """The registered handler of ``qtype``; UnsupportedError when there is none."""
    found = get_handler(qtype)
    if found is None:
        raise _unsupported(qtype)
    return found


def block_info(qtype: int) -> tuple[int, int]:
    """(elements per block, bytes per block) of ``qtype``.

    Known for every type GGML defines, dequantisable or not (so that a reader can size and
    skip tensors it cannot use); UnsupportedError only for an unknown type id.
    """
    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType(int(qtype))]
    except (ValueError, KeyError):
        raise _unsupported(qtype) from None


def tensor_nbytes(qtype: int, shape: Sequence[int]) -> int:
    """Bytes a tensor of ``qtype`` and (numpy-order) ``shape`` occupies in a GGUF file.

    ModelFormatError when a dimension is negative or the row length (last dim) is not a
    multiple of the block size.
    """
    dims = tuple(int(s) for s in shape)
    if any(s < 0 for s in dims):
        raise ModelFormatError(f"invalid tensor shape {dims}")
    block_size, type_size = block_info(qtype)
    row = dims[-1] if dims else 1
    if row % block_size:
        raise ModelFormatError(
            f"{type_name(qtype)} tensor of shape {dims}: row length {row} is not a multiple "
            f"of the block size {block_size}"
        )
    return math.prod(dims) // block_size * type_size


def dequantize(raw: torch.Tensor, qtype: int, shape: Sequence[int]) -> torch.Tensor:
    """The float32 tensor of ``shape`` stored as ``raw`` (the file's bytes) in type ``qtype``.

    ``raw`` may have any shape; it is read as its flat bytes (a non-uint8 tensor, e.g. a
    float32 memmap of an F32 tensor, is reinterpreted as its bytes).  Raises UnsupportedError
    for a type without a handler, ModelFormatError when the byte count does not match.
    """
    h = handler(qtype)
    dims = tuple(int(s) for s in shape)
    expected = tensor_nbytes(qtype, dims)
    flat = raw.contiguous().reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    if flat.numel() != expected:
        raise ModelFormatError(
            f"{h.name} tensor of shape {dims} needs {expected} bytes, got {flat.numel()}"
        )
    n_blocks = expected // h.type_size
    out = torch.empty((n_blocks, h.block_size), dtype=torch.float32, device=flat.device)
    blocks = flat.view(n_blocks, h.type_size)
    step = max(1, CHUNK_ELEMENTS // h.block_size)
    for start in range(0, n_blocks, step):
        stop = min(start + step, n_blocks)
        h.dequantize_into(blocks[start:stop], out[start:stop])
    return out.view(dims)
