"""The per-layer KV cache: [slots, H_kv, positions, head_dim], keys and values each in a type of
their own (llama.cpp's ``--cache-type-k`` / ``--cache-type-v``).

``f32``, ``f16``, ``bf16``: the vectors rounded to that type. ``q8_0``: ggml's Q8_0 along the
head dimension, blocks of 32 values as int8 with one float16 scale (``amax / 127``), 34 bytes
per 32 values; dequantised when attention reads them.

A quantised cache holds its vectors turned by a Walsh-Hadamard rotation, as llama.cpp's does
(``llama-kv-cache.cpp``, for head sizes that are multiples of 64): keys and queries in chunks of
the largest power of two (≥ 64) dividing the head size, so ``q·k`` is unchanged; values in
chunks of 64, turned back after attention. The rotation spreads a few large channels (Qwen's
keys have them) over the whole block, so one outlier no longer sets the scale of the rest:
measured on Qwen2.5-Coder-0.5B, it is the difference between +2.6 % and +0.5 % perplexity at
q8_0. The rotation is a fast transform of sums and differences, row by row, so like the
rest of the cache it gives the same bits whatever batch a step carries (decode stays
batch-invariant): a row's entries are written once, when its token is computed.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ..cache_types import CACHE_TYPES

if TYPE_CHECKING:
    from .layers import Rotary, Rows

FLOAT_TYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
Q8_BLOCK = 32


def quantize_q8_0(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [..., D] (D a multiple of 32) as int8 values and a float16 scale per 32, as ggml's
    ``quantize_row_q8_0`` does: ``d = amax / 127`` rounds the values (half away from zero) before
    it is stored as float16."""
    blocks = x.float().unflatten(-1, (-1, Q8_BLOCK))
    d = blocks.abs().amax(-1, keepdim=True) / 127.0
    scaled = blocks * torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = (torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)).to(torch.int8)
    return q.flatten(-2), d.squeeze(-1).to(torch.float16)


def dequantize_q8_0(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (q.float().unflatten(-1, (-1, Q8_BLOCK)) * scale.float().unsqueeze(-1)).flatten(-2)


def hadamard(x: torch.Tensor, n: int) -> torch.Tensor:
    """Each chunk of ``n`` (a power of two) along the last axis times the orthonormal Sylvester
    Walsh-Hadamard matrix (symmetric, its own inverse), by ``log2 n`` butterfly passes."""
    shape = x.shape
    y = x.float().reshape(-1, n)
    h = 1
    while h < n:
        y = y.view(y.shape[0], n // (2 * h), 2, h)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2).view(-1, n)
        h *= 2
    return (y * (1.0 / math.sqrt(n))).view(shape)


def rotation_sizes(head_dim: int, k_type: str, v_type: str) -> tuple[int, int]:
    """The Hadamard chunk sizes for keys and values (0: none), by llama.cpp's rule."""
    if head_dim % 64:
        return 0, 0
    k = 64
    while head_dim % (2 * k) == 0:
        k *= 2
    return (k if k_type == "q8_0" else 0), (64 if v_type == "q8_0" else 0)


class _Store:
    """One of K or V: its planes (the values; and the scales for q8_0) and how to fill and read them."""

    def __init__(self, kind: str, shape: tuple[int, int, int, int], device: torch.device | str) -> None:
        if kind not in CACHE_TYPES:
            raise ValueError(f"cache type {kind!r} is not one of {', '.join(CACHE_TYPES)}")
        self.kind = kind
        if kind == "q8_0":
            if shape[-1] % Q8_BLOCK:
                raise ValueError(f"a q8_0 cache needs a head size that is a multiple of {Q8_BLOCK} (this model: "
                                 f"{shape[-1]}); use f16, bf16 or f32")
            self.planes = (torch.zeros(shape, dtype=torch.int8, device=device),
                           torch.zeros(shape[:-1] + (shape[-1] // Q8_BLOCK,), dtype=torch.float16, device=device))
        else:
            self.planes = (torch.zeros(shape, dtype=FLOAT_TYPES[kind], device=device),)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return quantize_q8_0(x) if self.kind == "q8_0" else (x.to(self.planes[0].dtype),)

    def decode(self, parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Values from slices of the planes (a float cache gives its own slice, no copy)."""
        return dequantize_q8_0(*parts) if self.kind == "q8_0" else parts[0]

    def bytes_per_position(self) -> int:
        """Bytes of one position of one row (all heads)."""
        return sum(p[0, :, 0].numel() * p.element_size() for p in self.planes)


class KVCache:
    """Static per-layer cache; index on the third axis = token position."""

    def __init__(self, batch: int, n_head_kv: int, max_seq: int, head_dim: int, device: torch.device | str,
                 k_type: str = "f32", v_type: str = "f32") -> None:
        shape = (batch, n_head_kv, max_seq, head_dim)
        self.k, self.v = _Store(k_type, shape, device), _Store(v_type, shape, device)
        self.k_rot, self.v_rot = rotation_sizes(head_dim, k_type, v_type)

    def rotate_q(self, q: torch.Tensor) -> torch.Tensor:
        """Queries turned as the cached keys are (unchanged when they are not)."""
        return hadamard(q, self.k_rot).to(q.dtype) if self.k_rot else q

    def unrotate_out(self, out: torch.Tensor) -> torch.Tensor:
        """Attention's output turned back from the cached values' rotation."""
        return hadamard(out, self.v_rot).to(out.dtype) if self.v_rot else out

    @property
    def types(self) -> tuple[str, str]:
        return self.k.kind, self.v.kind

    def bytes_per_position(self) -> int:
        return self.k.bytes_per_position() + self.v.bytes_per_position()

    def update(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int,
               rows: "Rows | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v [B, H_kv, T, D] at ``pos`` ([T], or [B, T] per sequence) in ``rows`` (default
        0 .. B-1) and return the first ``kv_len`` positions of those rows."""
        batch = k.shape[0]
        if self.k_rot:
            k = hadamard(k, self.k_rot)
        if self.v_rot:
            v = hadamard(v, self.v_rot)
        for store, x in ((self.k, k), (self.v, v)):
            for plane, value in zip(store.planes, store.encode(x)):
                if rows is None and pos.dim() == 1:
                    plane[:batch].index_copy_(2, pos, value)
                else:
                    index = rows.index if rows is not None else torch.arange(batch, device=k.device)
                    p = pos if pos.dim() == 2 else pos.unsqueeze(0).expand(batch, -1)
                    plane[index.unsqueeze(1), :, p] = value.transpose(1, 2)  # [B, T, H, ...] at (row, pos)
        start = 0 if rows is None else rows.start
        pick = slice(start, start + batch) if start is not None else rows.index  # type: ignore[union-attr]
        return tuple(s.decode(tuple(p[pick, :, :kv_len] for p in s.planes)) for s in (self.k, self.v))  # type: ignore[return-value]

    def move(self, row: int, src: int, dst: int, n: int, rotary: "Rotary") -> None:
        """Move ``n`` cached positions of ``row`` from ``src`` to ``dst``, re-rotating the keys."""
        if n <= 0 or src == dst:
            return
        keys = self.k.decode(tuple(p[row, :, src : src + n].clone() for p in self.k.planes)).float()
        if self.k_rot:  # RoPE acts on the keys as they were: turn back, shift, turn again
            keys = hadamard(keys, self.k_rot)
        moved = rotary.shift(keys, dst - src)
        if self.k_rot:
            moved = hadamard(moved, self.k_rot)
        for plane, value in zip(self.k.planes, self.k.encode(moved)):
            plane[row, :, dst : dst + n] = value
        for plane in self.v.planes:
            plane[row, :, dst : dst + n] = plane[row, :, src : src + n].clone()

    def read(self, row: int, n: int) -> tuple[torch.Tensor, ...]:
        """A copy of the first ``n`` positions of ``row`` (every plane, K then V)."""
        return tuple(p[row, :, :n].clone() for p in (*self.k.planes, *self.v.planes))

    def write(self, row: int, saved: tuple[torch.Tensor, ...], n: int) -> None:
        """Put the first ``n`` positions of a :meth:`read` copy back into ``row``."""
        for plane, part in zip((*self.k.planes, *self.v.planes), saved):
            plane[row, :, :n] = part[:, :n]
