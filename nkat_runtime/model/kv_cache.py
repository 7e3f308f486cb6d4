"""The KV cache: one pool of fixed-size blocks for every layer, read and written through block
tables (vLLM's paged layout, on the CPU and, later, CUDA alike).

Each layer's keys (and values) are a plane ``[H_kv, blocks, block_size, head_dim]``: a
sequence's position ``p`` lives at offset ``p % block_size`` of block ``table[p // block_size]``.
A sequence whose table is a run of consecutive blocks is read as a view (no copy, as a
contiguous cache is); any other table is gathered. The pool of all layers is one tensor per
plane, so copying or clearing a block is one operation. Who owns which block, and which blocks
several sequences share, is :mod:`nkat_runtime.serve.block_pool`'s business: this module only
stores and reads.

Types (llama.cpp's ``--cache-type-k`` / ``--cache-type-v``): ``f32``, ``f16``, ``bf16``: the vectors
rounded to that type. ``q8_0``: ggml's Q8_0 along the head dimension, blocks of 32 values as int8
with one float16 scale (``amax / 127``), 34 bytes per 32 values; dequantised when attention reads
them.

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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from ..cache_types import CACHE_TYPES

if TYPE_CHECKING:
    from .layers import Rotary

FLOAT_TYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
Q8_BLOCK = 32
DEFAULT_BLOCK_SIZE = 32  # tokens per block


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


@dataclass
class SeqBlocks:
    """Where one sequence of a forward pass reads its first ``length`` positions: blocks
    ``first .. first + count - 1`` when they are consecutive (a view), else ``index``."""

    length: int
    first: int | None
    count: int
    index: torch.Tensor | None


class BlockView:
    """The block tables of one forward pass, turned once into what every layer needs: the flat
    slot (``block * block_size + offset``) of each new position, and each sequence's reads."""

    def __init__(self, tables: Sequence[Sequence[int]], pos: torch.Tensor, lengths: Sequence[int],
                 block_size: int) -> None:
        batch = len(tables)
        p = pos if pos.dim() == 2 else pos.unsqueeze(0).expand(batch, -1)
        index = [torch.tensor(list(t), dtype=torch.long, device=pos.device) for t in tables]  # once per table
        self.write = torch.cat([_through(t, row, block_size) for t, row in zip(index, p)])  # [B * T], sequence-major
        self.seqs: list[SeqBlocks] = []
        for table, t, n in zip(tables, index, lengths):
            count = -(-n // block_size)
            if len(table) < count:
                raise ValueError(f"a block table of {len(table)} blocks cannot hold {n} positions")
            blocks = list(table[:count])
            if blocks == list(range(blocks[0], blocks[0] + count)):
                self.seqs.append(SeqBlocks(n, blocks[0], count, None))
            else:
                self.seqs.append(SeqBlocks(n, None, count, t[:count]))


@dataclass
class PaddedView:
    """A decode step's block tables as device tensors of a fixed shape, the form a CUDA graph
    replays: row ``b`` writes its new entry at flat slot ``write[b]`` and reads positions
    ``0 .. lengths[b] - 1`` through ``table[b]`` ([B, M] blocks; the entries past a row's last
    block name a block that row may read, and are masked)."""

    write: torch.Tensor  # [B]
    table: torch.Tensor  # [B, M]
    lengths: torch.Tensor  # [B]
    block_size: int

    @classmethod
    def of(cls, table: torch.Tensor, pos: torch.Tensor, block_size: int) -> "PaddedView":
        """The view of one decode step at positions ``pos`` [B] (device ops only: no host sync)."""
        return cls(_through(table, pos[:, None], block_size)[:, 0], table, pos + 1, block_size)

    def mask(self, window: int = 0) -> torch.Tensor:
        """[B, 1, 1, M * block_size]: key s is visible to row b's query when s < lengths[b] (and
        within ``window`` of it)."""
        keys = torch.arange(self.table.shape[1] * self.block_size, device=self.table.device)[None, :]
        n = self.lengths[:, None]
        allowed = keys < n
        if window > 0:
            allowed = allowed & (n - 1 - keys < window)
        return allowed[:, None, None, :]


def _through(table: torch.Tensor, pos: torch.Tensor, block_size: int) -> torch.Tensor:
    """The flat slot (``block * block_size + offset``) of each position of ``pos`` through ``table``
    (a table [N] and positions [T], or tables [B, M] and positions [B, T])."""
    return table.gather(-1, pos // block_size) * block_size + pos % block_size


class _Store:
    """One of K or V for all layers: its planes [L, H_kv, blocks, block_size, D] (the values; and
    the scales for q8_0) and how to fill and read them."""

    def __init__(self, kind: str, shape: tuple[int, ...], device: torch.device | str, lazy: bool) -> None:
        if kind not in CACHE_TYPES:
            raise ValueError(f"cache type {kind!r} is not one of {', '.join(CACHE_TYPES)}")
        self.kind = kind
        new = torch.empty if lazy else torch.zeros  # lazy: pages are touched when a block is first used
        if kind == "q8_0":
            if shape[-1] % Q8_BLOCK:
                raise ValueError(f"a q8_0 cache needs a head size that is a multiple of {Q8_BLOCK} (this model: "
                                 f"{shape[-1]}); use f16, bf16 or f32")
            self.planes = (new(shape, dtype=torch.int8, device=device),
                           new(shape[:-1] + (shape[-1] // Q8_BLOCK,), dtype=torch.float16, device=device))
        else:
            self.planes = (new(shape, dtype=FLOAT_TYPES[kind], device=device),)
        self.scratch: dict[int, torch.Tensor] = {}  # float32 reads of a 16-bit cache, one per sequence of a pass

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return quantize_q8_0(x) if self.kind == "q8_0" else (x.to(self.planes[0].dtype),)

    def decode(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """Values from parts of the planes (a float cache gives its own part, no copy)."""
        return dequantize_q8_0(*parts) if self.kind == "q8_0" else parts[0]

    def decode_float(self, parts: Sequence[torch.Tensor], slot: int) -> torch.Tensor:
        """:meth:`decode` as float32, a 16-bit cache's values widened into this store's scratch
        buffer ``slot`` (valid until the next read of that slot: attention uses a layer's keys
        and values before the next layer reads). A fresh float32 tensor per read cost more than
        the widening itself (measured: 32 µs against 6 µs for 266 × 128 values; allocations of
        that size are mapped and faulted in each time)."""
        if self.kind == "q8_0" or parts[0].dtype == torch.float32:
            return self.decode(parts)
        src = parts[0]
        buf = self.scratch.get(slot)
        if buf is None or buf.numel() < src.numel():
            buf = self.scratch[slot] = torch.empty(max(2 * src.numel(), 1 << 16), dtype=torch.float32,
                                                   device=src.device)
        return buf[: src.numel()].view(src.shape).copy_(src)

    def bytes_per_position(self) -> int:
        """Bytes of one position of one layer (all heads)."""
        return sum(p[0, :, 0, 0].numel() * p.element_size() for p in self.planes)


class KVPool:
    """The block pool of every layer: ``n_blocks`` blocks of ``block_size`` positions."""

    def __init__(self, n_layer: int, n_head_kv: int, head_dim: int, n_blocks: int, block_size: int,
                 device: torch.device | str, k_type: str = "f32", v_type: str = "f32", lazy: bool = False) -> None:
        if n_blocks < 1 or block_size < 1:
            raise ValueError("the KV pool needs at least one block of at least one position")
        shape = (n_layer, n_head_kv, n_blocks, block_size, head_dim)
        self.k, self.v = _Store(k_type, shape, device, lazy), _Store(v_type, shape, device, lazy)
        self.n_blocks, self.block_size = n_blocks, block_size
        self.k_rot, self.v_rot = rotation_sizes(head_dim, k_type, v_type)
        self.layers = [KVCache(self, i) for i in range(n_layer)]

    @property
    def types(self) -> tuple[str, str]:
        return self.k.kind, self.v.kind

    def _planes(self) -> tuple[torch.Tensor, ...]:
        return (*self.k.planes, *self.v.planes)

    def bytes_per_token(self) -> int:
        """Bytes one cached position takes in every layer, K and V."""
        return len(self.layers) * (self.k.bytes_per_position() + self.v.bytes_per_position())

    def copy_block(self, src: int, dst: int) -> None:
        for p in self._planes():
            p[:, :, dst] = p[:, :, src]

    def zero_block(self, block: int) -> None:
        for p in self._planes():
            p[:, :, block].zero_()


class KVCache:
    """One layer's view of the pool."""

    def __init__(self, pool: KVPool, layer: int) -> None:
        self.pool, self.layer = pool, layer
        self.k_rot, self.v_rot = pool.k_rot, pool.v_rot

    @property
    def types(self) -> tuple[str, str]:
        return self.pool.types

    @property
    def k(self) -> _Store:
        return self.pool.k

    @property
    def v(self) -> _Store:
        return self.pool.v

    def _flat(self, plane: torch.Tensor) -> torch.Tensor:
        """This layer's part of a plane as [H_kv, blocks * block_size, ...]."""
        p = plane[self.layer]
        return p.view(p.shape[0], -1, *p.shape[3:])

    def rotate_q(self, q: torch.Tensor) -> torch.Tensor:
        """Queries turned as the cached keys are (unchanged when they are not)."""
        return hadamard(q, self.k_rot).to(q.dtype) if self.k_rot else q

    def unrotate_out(self, out: torch.Tensor) -> torch.Tensor:
        """Attention's output turned back from the cached values' rotation."""
        return hadamard(out, self.v_rot).to(out.dtype) if self.v_rot else out

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k/v [B, H_kv, T, D] at the flat ``slots`` [B * T] (sequence-major)."""
        if self.k_rot:
            k = hadamard(k, self.k_rot)
        if self.v_rot:
            v = hadamard(v, self.v_rot)
        for store, x in ((self.k, k), (self.v, v)):
            x = x.transpose(0, 1).flatten(1, 2)  # [H, B * T, D]
            for plane, value in zip(store.planes, store.encode(x)):
                self._flat(plane).index_copy_(1, slots, value)

    def read(self, seq: SeqBlocks, slot: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """One sequence's first ``seq.length`` keys and values [1, H_kv, n, D] as float32, the
        ``slot``-th read of a pass (its scratch buffers, :meth:`_Store.decode_float`)."""
        out = []
        for store in (self.k, self.v):
            parts = []
            for plane in store.planes:
                p = plane[self.layer]
                got = p[:, seq.first : seq.first + seq.count] if seq.index is None else p.index_select(1, seq.index)
                parts.append(got.reshape(p.shape[0], -1, *p.shape[3:])[:, : seq.length].unsqueeze(0))
            out.append(store.decode_float(parts, slot))
        return out[0], out[1]

    def read_padded(self, view: PaddedView) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's keys and values through its padded table, [B, H_kv, M * block_size, D]
        (in the cache's float type; gathered into one new tensor per plane)."""
        B, M = view.table.shape
        out = []
        for store in (self.k, self.v):
            parts = []
            for plane in store.planes:
                p = plane[self.layer]  # [H, blocks, block_size, ...]
                got = p.index_select(1, view.table.reshape(-1))
                parts.append(got.view(p.shape[0], B, M * p.shape[2], *p.shape[3:]).transpose(0, 1))
            out.append(store.decode(parts))
        return out[0], out[1]

    def update(self, view: BlockView | PaddedView, k: torch.Tensor,
               v: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Write the new k/v and return every sequence's keys and values (see :meth:`read`; a
        padded view gives one pair for the whole batch)."""
        self.write(view.write, k, v)
        if isinstance(view, PaddedView):
            return [self.read_padded(view)]
        return [self.read(s, i) for i, s in enumerate(view.seqs)]

    # --- positions by table: moves and copies ---------------------------------------------------
    def positions(self, store: _Store, table: Sequence[int], start: int, stop: int) -> tuple[torch.Tensor, ...]:
        """Copies of ``store``'s planes at positions ``start .. stop-1`` of ``table`` ([H_kv, n, ...])."""
        slots = _slots(table, start, stop, self.pool.block_size, store.planes[0].device)
        return tuple(self._flat(p).index_select(1, slots) for p in store.planes)

    def _put(self, store: _Store, table: Sequence[int], start: int, parts: Sequence[torch.Tensor]) -> None:
        slots = _slots(table, start, start + parts[0].shape[1], self.pool.block_size, parts[0].device)
        for plane, part in zip(store.planes, parts):
            self._flat(plane).index_copy_(1, slots, part)

    def move(self, table: Sequence[int], src: int, dst: int, n: int, rotary: "Rotary") -> None:
        """Move ``n`` positions of ``table`` from ``src`` to ``dst``, re-rotating the keys."""
        if n <= 0 or src == dst:
            return
        keys = self.k.decode(self.positions(self.k, table, src, src + n)).float()
        if self.k_rot:  # RoPE acts on the keys as they were: turn back, shift, turn again
            keys = hadamard(keys, self.k_rot)
        moved = rotary.shift(keys, dst - src)
        if self.k_rot:
            moved = hadamard(moved, self.k_rot)
        self._put(self.k, table, dst, self.k.encode(moved))
        self._put(self.v, table, dst, self.positions(self.v, table, src, src + n))

    def copy_out(self, table: Sequence[int], n: int) -> tuple[torch.Tensor, ...]:
        """A copy of the first ``n`` positions of ``table`` (every plane, K then V)."""
        return (*self.positions(self.k, table, 0, n), *self.positions(self.v, table, 0, n))

    def copy_in(self, table: Sequence[int], saved: Sequence[torch.Tensor], n: int) -> None:
        """Put the first ``n`` positions of a :meth:`copy_out` copy back at ``table``."""
        nk = len(self.k.planes)
        self._put(self.k, table, 0, [p[:, :n] for p in saved[:nk]])
        self._put(self.v, table, 0, [p[:, :n] for p in saved[nk:]])


def _slots(table: Sequence[int], start: int, stop: int, block_size: int, device) -> torch.Tensor:
    return _through(torch.tensor(list(table), dtype=torch.long, device=device), torch.arange(start, stop, device=device),
                    block_size)
