"""Linear layers whose weight stays GGUF blocks (as planes, ``quant/planes.py``).

``y = x·Wᵀ`` is computed straight from the planes: the dequantisation expression is fused
into the reduction by torch.compile (inductor writes one C++/OpenMP loop on the CPU, a Triton
kernel on CUDA), so each step reads the file's bytes and never a float32 copy of W.

- A few rows (decode, any batch size in a decode step): the fused product. Each output is one
  reduction over K, the same code whatever the number of rows, so a row's bits do not depend on
  the batch (checked by the tests at 1–9 rows).
- Many rows (prefill): W is dequantised a tile of output rows at a time, by the same fused
  expression, for a float32 GEMM; the tile is the only float copy and lives for one GEMM.

Compiled code is cached on disk (``~/.cache/nkat/inductor/<cpu>``), so a second start
only loads it. Where torch.compile cannot run (no C++ compiler), the same expressions run
eagerly, a tile at a time: correct, slower, and said once in the log.
"""

from __future__ import annotations

import logging
import math
import os
from functools import lru_cache
from typing import Callable

import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn

from ..quant import planes as qp
from .linear import is_decode

log = logging.getLogger(__name__)

#: rows of activations from which a packed layer (int4 or planes), outside a decode step,
#: dequantises its weight for a float32 GEMM instead of running its kernel
DENSE_FROM_ROWS = 16
#: weights per dequantised tile (16 MiB of float32)
TILE_ELEMENTS = 1 << 22


#: weights of one row summed in one run: x's slice for a run (16 KiB of float32) stays in L1
#: while all rows pass over it; longer rows (K = 8960: 35 KiB of x) ran at half the speed
REDUCTION_RUN = 4096


def _runs(nb: int, per_block: int) -> int:
    """Runs a row of ``nb`` blocks is cut into: the fewest that keep each within REDUCTION_RUN."""
    return next(r for r in range(1, nb + 1) if nb % r == 0 and (nb // r * per_block <= REDUCTION_RUN or r == nb))


def _product(qtype: int) -> Callable[[qp.Planes, torch.Tensor], torch.Tensor]:
    def product(planes: qp.Planes, x: torch.Tensor) -> torch.Tensor:
        w = qp.weights(planes, qtype)  # [N, NB, *inner]
        n, nb, inner = w.shape[0], w.shape[1], w.shape[2:]
        runs = _runs(nb, math.prod(inner))
        if runs == 1:  # [N, M]: a row of W is read once for all M
            return (w.unsqueeze(1) * x.view(1, x.shape[0], *w.shape[1:])).sum(tuple(range(2, w.dim() + 1)))
        # [runs, N, M] partial sums, the run outermost: every row passes over one slice of x at a time
        wr = w.view(n, runs, nb // runs, *inner).transpose(0, 1).unsqueeze(2)
        xr = x.view(x.shape[0], runs, nb // runs, *inner).transpose(0, 1).unsqueeze(1)
        return (wr * xr).sum(tuple(range(3, wr.dim()))).sum(0)

    return product


def _dequant(qtype: int) -> Callable[[qp.Planes], torch.Tensor]:
    def dequant(planes: qp.Planes) -> torch.Tensor:
        w = qp.weights(planes, qtype)
        return w.reshape(w.shape[0], -1)

    return dequant


def _cpu_tag() -> str:
    """Compiled CPU code targets this machine (``-march=native``): a folder per instruction set."""
    return "cpu-" + torch.backends.cpu.get_cpu_capability().lower()


#: compiled variants dynamo keeps per code object: every kernel of one kind shares its code
#: (types × row lengths × a test run's many models), and dynamo's default of 8 would fail
RECOMPILE_LIMIT = 256


def use_kernel_cache() -> None:
    """Point inductor at ``~/.cache/nkat/inductor/<cpu>`` unless TORCHINDUCTOR_CACHE_DIR is set,
    and let dynamo keep a compiled variant per (type, row length) (as vLLM raises its limit)."""
    import torch._dynamo.config
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from ..bundled import cache_dir

    # torch writes its default into the variable when inductor first looks: that one is not a choice
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir() / "inductor" / _cpu_tag())
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)


class _Kernel:
    """One fused function, compiled on first use; eager when compiling fails."""

    def __init__(self, fn: Callable, name: str) -> None:
        self.fn, self.name = fn, name
        self.compiled: Callable | None = None
        self.failed = os.environ.get("NKAT_NO_COMPILE") == "1"

    def __call__(self, *args):
        if not self.failed:
            if self.compiled is None:
                use_kernel_cache()
                self.compiled = torch.compile(self.fn, dynamic=True, fullgraph=True)
            try:
                return self.compiled(*args)
            except Exception as exc:  # noqa: BLE001 - any compiler failure falls back
                self.failed = True
                log.warning("fused kernel %s could not be compiled (%s: %s); running it eagerly",
                            self.name, type(exc).__name__, str(exc).splitlines()[0][:200])
        return None


# One kernel per (type, K): a model has a handful of row lengths, and dynamo then sees the same
# code object with only the row counts changing, which it treats as dynamic sizes.


@lru_cache(maxsize=None)
def product_kernel(qtype: int, k: int) -> _Kernel:
    return _Kernel(_product(qtype), f"product[{qtype}, K={k}]")


@lru_cache(maxsize=None)
def dequant_kernel(qtype: int, k: int) -> _Kernel:
    return _Kernel(_dequant(qtype), f"dequant[{qtype}, K={k}]")


def _row_length(planes: qp.Planes, qtype: int) -> int:
    first = next(iter(planes.values()))
    return first.shape[1] * math.prod(qp.INNER[qtype])


def _slice(planes: qp.Planes, start: int, stop: int) -> qp.Planes:
    return {k: v[start:stop] for k, v in planes.items()}


def dequantize_rows(planes: qp.Planes, qtype: int, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of W as float32 [rows, K] (bit-exact with gguf-py)."""
    part = _slice(planes, start, stop)
    w = dequant_kernel(qtype, _row_length(planes, qtype))(part)
    return _dequant(qtype)(part) if w is None else w


def fused_matmul(planes: qp.Planes, qtype: int, x: torch.Tensor) -> torch.Tensor:
    """float32 x [M, K] · Wᵀ → [M, N], reading only the planes."""
    if torch.compiler.is_compiling():  # inside a compiled model step: traced into its graph
        return _product(qtype)(planes, x).t().contiguous()
    # one compiled kernel for every row count, 1 included: dynamo would otherwise specialise
    # M = 1 into a kernel of its own, with another summation order (measured: other bits)
    torch._dynamo.decorators.mark_unbacked(x, 0)
    y = product_kernel(qtype, x.shape[1])(planes, x)
    if y is not None:
        return y.t().contiguous()  # contiguous: a strided result would take other code paths downstream
    n, k = next(iter(planes.values())).shape[0], x.shape[1]
    return tiled_matmul(planes, qtype, x, n, k)


def tiled_matmul(planes: qp.Planes, qtype: int, x: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """x·Wᵀ with W dequantised a tile of rows at a time for a float32 GEMM."""
    y = torch.empty(x.shape[0], n, dtype=torch.float32, device=x.device)
    step = max(16, TILE_ELEMENTS // k)
    for r in range(0, n, step):
        stop = min(n, r + step)
        y[:, r:stop] = F.linear(x, dequantize_rows(planes, qtype, r, stop))
    return y


class FusedLinear(nn.Module):
    """``y = x·Wᵀ (+ b)`` with W [N, K] held as the planes of its GGUF blocks."""

    def __init__(self, planes: qp.Planes, qtype: int, shape: tuple[int, int], type_name: str,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        for name, t in planes.items():
            self.register_buffer(name, t, persistent=False)
        self.plane_names = tuple(planes)
        self.qtype, self.type_name = int(qtype), type_name
        self.out_features, self.in_features = shape
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)
        self.dense_from_rows = DENSE_FROM_ROWS

    @property
    def planes(self) -> qp.Planes:
        return {name: getattr(self, name) for name in self.plane_names}

    def extra_repr(self) -> str:
        return f"{self.in_features}→{self.out_features}, {self.type_name} blocks"

    def weight_bytes(self) -> int:
        return qp.nbytes(self.planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()
        if x2.shape[0] >= self.dense_from_rows and not is_decode(x):
            y = tiled_matmul(self.planes, self.qtype, x2, self.out_features, self.in_features)
        else:
            y = fused_matmul(self.planes, self.qtype, x2.contiguous())
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features).to(x.dtype)
