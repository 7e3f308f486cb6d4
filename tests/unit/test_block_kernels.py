"""Every type's kernel against gguf-py's dequantisation followed by a float64 matmul.

The fast path's linear for each GGUF type (int4 kernel for 4-bit codes, fused plane kernels for
the rest) is fed random blocks (any bytes, finite f16 scales) and compared with
``gguf.quants.dequantize`` then a float64 product, for 1, 3, 8, 17, 64 and 256 rows, as decode
steps (``[M, 1, K]``: the fused or int4 kernel at any M) and as plain rows (``[M, K]``: from
``DENSE_FROM_ROWS`` (256) rows on, a float32 GEMM over dequantised tiles), on ragged shapes. The bound is the
accumulation dtype's: ``K · u · Σ|w||x|`` with u the unit roundoff of float32 (fused, GEMM)
or of bf16 (the int4 kernel rounds x, S and Z to bf16).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf import quants as gguf_quants

from nkat_runtime.gguf.reader import TensorRef
from nkat_runtime.model import fused, packed
from nkat_runtime.quant import planes

CPU = torch.device("cpu")
F16_FIELDS = {T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,),
              T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}
ROWS = (1, 3, 8, 17, 64, 256)
U_F32, U_BF16 = 2.0**-24, 2.0**-8


def random_blocks(qtype: T, n: int, k: int, seed: int) -> np.ndarray:
    """uint8 [n, k/block, type_size]: random bytes with finite f16 scales of mixed magnitude."""
    rng = np.random.default_rng(seed)
    block, size = GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        vals = (rng.uniform(-1, 1, (n, k // block)) * 10.0 ** rng.uniform(-3, 0, (n, 1))).astype(np.float16)
        data[..., off : off + 2] = vals.view(np.uint8).reshape(n, k // block, 2)
    return data


def tensor_ref(data: np.ndarray, qtype: T, n: int, k: int) -> TensorRef:
    raw = data.reshape(-1)
    return TensorRef(name="w", qtype=int(qtype), shape=(n, k), offset=0, raw=raw)


def check(got: torch.Tensor, x: torch.Tensor, w: np.ndarray, u: float) -> None:
    x64, w64 = x.reshape(-1, x.shape[-1]).double(), torch.from_numpy(w).double()
    expected = x64 @ w64.t()
    bound = w.shape[1] * u * (x64.abs() @ w64.abs().t()) + 1e-30
    err = (got.reshape(expected.shape).double() - expected).abs()
    worst = float((err / bound).max())
    assert worst <= 1.0, f"error {worst:.3g}× the bound"


# rows a multiple of 16: the int4 kernel (4-, 5-, 8-bit types); other row counts: planes
CASES = [(T.Q4_0, 48, 96), (T.Q4_0, 37, 96), (T.Q4_1, 48, 160), (T.Q4_K, 80, 512), (T.Q4_K, 19, 512),
         (T.Q5_0, 48, 96), (T.Q5_0, 37, 96), (T.Q5_1, 32, 64), (T.Q5_1, 21, 64), (T.Q5_K, 32, 512),
         (T.Q5_K, 19, 512), (T.Q8_0, 64, 128), (T.Q8_0, 200, 96), (T.Q8_0, 24, 4160), (T.Q6_K, 45, 768),
         (T.Q6_K, 16, 5120), (T.Q3_K, 33, 256), (T.Q2_K, 50, 512)]


@pytest.mark.parametrize("qtype,n,k", CASES, ids=[f"{c[0].name}-{c[1]}x{c[2]}" for c in CASES])
def test_kernel_matches_gguf_py_and_float64(qtype, n, k):
    data = random_blocks(qtype, n, k, seed=int(qtype))
    w = gguf_quants.dequantize(data.reshape(n, -1), qtype).reshape(n, k)
    layer = packed.pack_linear(tensor_ref(data, qtype, n, k), CPU)
    on_int4 = isinstance(layer, packed.Int4Linear)
    assert on_int4 or isinstance(layer, fused.FusedLinear), type(layer)
    x = torch.randn(max(ROWS), k, generator=torch.Generator().manual_seed(1))
    for m in ROWS:
        check(layer(x[:m].reshape(m, 1, k)), x[:m], w, U_BF16 if on_int4 else U_F32)  # decode step
        dense = m >= packed.DENSE_FROM_ROWS
        check(layer(x[:m]), x[:m], w, U_F32 if dense or not on_int4 else U_BF16)  # rows


@pytest.mark.parametrize("qtype", sorted(planes.TYPES), ids=lambda t: T(t).name)
def test_planes_dequantise_bit_exact(qtype):
    n, k = 29, 512
    data = random_blocks(T(qtype), n, k, seed=100 + qtype)
    ref = gguf_quants.dequantize(data.reshape(n, -1), T(qtype)).reshape(n, k)
    p = planes.split(torch.from_numpy(data), qtype)
    for start, stop in ((0, n), (3, 17)):
        got = fused.dequantize_rows(p, qtype, start, stop)
        assert torch.equal(got.view(torch.int32), torch.from_numpy(ref[start:stop]).view(torch.int32))


@pytest.mark.parametrize("qtype,k", [(planes.Q6_K, 512), (planes.Q6_K, 4608), (planes.Q8_0, 512),
                                     (planes.Q5_0, 512), (planes.Q3_K, 512)],
                         ids=["Q6_K", "Q6_K-runs", "Q8_0", "Q5_0", "Q3_K"])
def test_fused_rows_do_not_depend_on_the_batch(qtype, k):
    """Rows longer than ``fused.REDUCTION_RUN`` (4608) are summed in runs: invariant too."""
    n = 70
    data = random_blocks(T(qtype), n, k, seed=7)
    layer = packed.pack_linear(tensor_ref(data, T(qtype), n, k), CPU)
    x = torch.randn(9, 1, k, generator=torch.Generator().manual_seed(2))
    together = layer(x)
    for m in range(1, 10):
        assert torch.equal(layer(x[:m]), together[:m])
    for i in range(9):
        assert torch.equal(layer(x[i : i + 1]), together[i : i + 1])
    assert together.is_contiguous()


def test_plane_bytes_stay_near_the_file():
    """Planes hold the file's bytes (Q8_0, bit types) or widen 5–6-bit codes to one byte."""
    limits = {T.Q8_0: 1.0, T.Q2_K: 1.0, T.Q3_K: 1.04, T.Q6_K: 1.31, T.Q5_0: 1.55, T.Q5_1: 1.5, T.Q5_K: 1.57}
    for qtype, limit in limits.items():
        n, k = 16, 512
        data = random_blocks(qtype, n, k, seed=3)
        ratio = planes.nbytes(planes.split(torch.from_numpy(data), int(qtype))) / data.size
        assert ratio <= limit, (qtype.name, ratio)
