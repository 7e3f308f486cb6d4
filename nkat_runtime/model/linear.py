"""Dense linear layers, and how a batched decode step keeps every row's bits its own.

``DenseLinear`` holds a weight dequantised once at load to float32: every weight on the
reference path, the types that do not pack on the fast path (``packed.py``). Packed forms
and the θ star-product wrap or replace it without the model code knowing.

**Batch invariance.** A sequence decoded among others must get the bits it gets alone, on any
CPU. A BLAS GEMM does not give that: MKL picks its blocking (and with it each output's
summation order) from the shape, so a row's result depends on how many rows come with it
(measured: different bits for 1, 4 and 8 rows on an AMD EPYC, for 1 and 16 on a Xeon). So in a
decode step (one token per sequence, ``x`` [B, 1, K]) a row-local layer makes every row a
problem of its own: a 1-row product, the same call whatever B is, over fixed tiles of W's
output rows so each tile is read from memory once per step. (Posing the rows as the items of one
batched GEMM, as this module did first, held on an AMD EPYC but not on a Xeon with AVX-512: see
``row_local_matmul``.) The tests check on every run
that a row's bits equal a standalone 1-row product's, batched or alone, at several thread
counts and instruction sets. The int4 kernel (``int4.py``) needs none of this: each output is
one sequential sum over K whatever M is. Transcendental element-wise ops (the FFN activation)
are applied row by row too: torch computes the tail of each thread's share with scalar code,
which rounds differently from the vector code, and the shares depend on the size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: bytes of W per tile in a row-local product (measured on a 2-core EPYC: 4 MiB beat 1 and 16)
TILE_BYTES = 4 << 20


def is_decode(x: torch.Tensor) -> bool:
    """``x`` [B, 1, K]: one token per sequence, the step whose rows must not see each other."""
    return x.dim() == 3 and x.shape[1] == 1


def tile_rows(out_features: int, in_features: int, element_size: int) -> int:
    """Output rows per tile of a row-local product: a function of W's shape only."""
    rows = TILE_BYTES // max(1, in_features * element_size)
    return max(16, min(out_features, rows // 16 * 16))


def own_row(x: torch.Tensor, i: int) -> torch.Tensor:
    """Row ``i`` of x [M, ...] as [1, ...] at the address alignment a fresh tensor has (64 bytes), so
    a kernel that peels loads up to an aligned address runs the same instructions on it alone."""
    row = x[i : i + 1]
    return row if aligned(row) else row.clone(memory_format=torch.contiguous_format)


def aligned(t: torch.Tensor) -> bool:
    """Whether ``t`` is contiguous from a 64-byte boundary, as every fresh tensor is."""
    return t.is_contiguous() and t.data_ptr() % 64 == 0


def row_local_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x·Wᵀ`` for x [M, K], W [N, K]: each row its own 1-row product, as it is alone.

    Each row is one call of its own, over fixed tiles of W's rows (a tile's loop runs every row
    while the tile is in cache). One batched GEMM over the rows is not enough: MKL threads inside
    an item of a small batch and across the items of a large one, and on a Xeon with AVX-512 the
    two give different bits (measured at 2, 3 and 6 threads; not on an AMD EPYC, whose MKL runs its
    AVX2 kernels)."""
    n, k = w.shape
    m = x.shape[0]
    x = x.to(w.dtype)
    step = tile_rows(n, k, w.element_size())
    rows = [own_row(x, i) for i in range(m)]
    if step >= n and m == 1:
        return torch.mm(rows[0], w.t())
    y = torch.empty(m, n, dtype=w.dtype, device=x.device)
    for start in range(0, n, step):
        tile = w[start : start + step].t()
        stop = start + tile.shape[1]
        for i, row in enumerate(rows):
            y[i : i + 1, start:stop] = torch.mm(row, tile)
    return y


def rowwise(fn, x: torch.Tensor) -> torch.Tensor:
    """``fn`` applied to each row of x [B, ...] on its own (the same call a batch of one makes)."""
    if x.shape[0] == 1:
        return fn(x)
    return torch.cat([fn(x[i : i + 1]) for i in range(x.shape[0])])


class RowLocal:
    """A layer with a batch-invariant decode mode (``row_local``; on by default). Turning it
    off (``DecoderModel.set_batch_invariant(False)``) multiplies a decode step's rows as one
    GEMM: faster when dense weights are large, but a row's bits then depend on the batch."""

    row_local: bool = True


class DenseLinear(RowLocal, nn.Module):
    """``y = x·Wᵀ (+ b)`` with W [out, in] held dense."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def weight_bytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Computed in the weight's dtype, returned in ``x``'s."""
        w = self.weight
        if self.row_local and is_decode(x):
            y = row_local_matmul(x.reshape(-1, x.shape[-1]), w).view(*x.shape[:-1], -1)
        elif w.dtype == x.dtype:
            return F.linear(x, w, self.bias)
        else:
            y = F.linear(x.to(w.dtype), w)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype)
