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

import json
import logging
import math
import os
import platform
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import planes as qp
from .linear import is_decode

log = logging.getLogger(__name__)

#: rows of activations from which a packed layer (int4 or planes), outside a decode step,
#: dequantises its weight for a float32 GEMM instead of running its kernel. Measured on a 2-core
#: AMD EPYC (whole forward passes, Qwen2.5-Coder-1.5B / Gemma 3 270M, 2 threads): the kernels are
#: 1.3-5x faster up to 128 rows, the dequantised GEMM 1.1-1.2x faster at 256, so a full 256-token
#: prefill chunk goes dense and a chat turn's few dozen new tokens do not pay a whole dequantisation.
DENSE_FROM_ROWS = 256
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
    """Point inductor at ``~/.cache/nkat/inductor/<cpu>`` unless TORCHINDUCTOR_CACHE_DIR is set."""
    from ..bundled import cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is not None:  # inductor is imported already if it wrote its default (importing it: 1.5 s)
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        if current != default_cache_dir():  # torch writes its default there when it first looks: no choice
            return
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir() / "inductor" / _cpu_tag())


@lru_cache(maxsize=None)
def trust_vec_isa() -> bool:
    """Skip inductor's vector-ISA probes on starts after the first (1.4 s each start here).

    inductor checks every vector instruction set the CPU reports by compiling a probe library and
    loading it in a child Python, again on every start. Once all of them passed on this machine
    with this torch and compiler, a stamp in the kernel cache says so and ``vec_isa_ok`` is set;
    it is set on the first start too, right after the probes pass, so that every start compiles
    under the same inductor configuration (it is part of the kernel cache's key). True when set.
    """
    from torch._inductor import config as inductor_config
    from torch._inductor import cpp_builder, cpu_vec_isa

    if inductor_config.cpp.vec_isa_ok is not None or platform.machine() not in ("x86_64", "AMD64"):
        return False
    flags = cpu_vec_isa.x86_isa_checker()
    candidates = [str(i) for i in cpu_vec_isa.supported_vec_isa_list if all(f in flags for f in str(i).split())]
    try:
        compiler = cpp_builder.get_cpp_compiler()
    except Exception:  # noqa: BLE001 - no compiler: inductor reports it on its own
        return False
    ident = json.dumps([torch.__version__, sorted(flags), candidates, compiler])
    stamp = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR", "")) / "nkat-vec-isa-ok.json"
    try:
        known = stamp.read_text() == ident
    except OSError:
        known = False
    if not known:
        if [str(i) for i in cpu_vec_isa.valid_vec_isa_list()] != candidates:
            return False  # a probe failed: inductor goes on probing (and picks what passed)
        try:
            stamp.parent.mkdir(parents=True, exist_ok=True)
            tmp = stamp.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(ident)
            os.replace(tmp, stamp)
        except OSError:
            pass
    inductor_config.cpp.vec_isa_ok = True
    return True


class _Kernel:
    """One fused function, compiled on first use; eager when compiling fails."""

    def __init__(self, fn: Callable, name: str, unbacked_rows: bool = False) -> None:
        self.fn, self.name, self.unbacked_rows = fn, name, unbacked_rows
        self.compiled: Callable | None = None
        self.failed = os.environ.get("NKAT_NO_COMPILE") == "1"

    def __call__(self, *args):
        if not self.failed:
            import torch._dynamo  # imported here, not with the module: 1.3 s, and only compiling needs it

            if self.compiled is None:
                use_kernel_cache()
                trust_vec_isa()
                # a compiled variant per (type, row length): all share one code object (vLLM raises it too)
                torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
                self.compiled = torch.compile(self.fn, dynamic=True, fullgraph=True)
            # one compiled kernel for every row count, 1 included: dynamo would otherwise specialise
            # M = 1 into a kernel of its own, with another summation order (measured: other bits)
            if self.unbacked_rows:
                torch._dynamo.decorators.mark_unbacked(args[-1], 0)
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
    return _Kernel(_product(qtype), f"product[{qtype}, K={k}]", unbacked_rows=True)


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
