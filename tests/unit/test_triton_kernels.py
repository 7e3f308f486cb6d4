"""The CUDA path's Triton kernels, without a GPU: run under Triton's interpreter on CPU tensors
against gguf-py's dequantisation and a float64 product, inside NaN padding (the interpreter does
not catch out-of-bounds reads; a read past the tensor picks up a NaN and shows), and compiled for
sm_86 to check that no kernel spills registers or overflows shared memory (``cuda/aot.py``)."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from gguf import quants
from gguf.constants import GGMLQuantizationType as T

pytest.importorskip("triton")

from aotcheck import aot  # noqa: E402
from paths import REPO  # noqa: E402

sys.path.append(str(REPO / "benchmarks"))  # after site-packages: a script must never shadow a package
from synthetic_gguf import F16_FIELDS, random_blocks_np  # noqa: E402  (the blocks gpu_check times)

PAD = 3  # rows of NaN bytes around a weight, rows and columns of NaN around the activations


@pytest.fixture(scope="module")
def cuda_pkg():
    """``nkat_runtime.cuda``'s kernels as the interpreter runs them (conftest sets the flag before
    torch imports triton)."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "conftest sets TRITON_INTERPRET=1"
    from nkat_runtime.cuda import kernels, ops

    return kernels, ops


def _blocks(qtype: T, n: int, k: int, seed: int = 0) -> np.ndarray:
    """Random blocks of ``qtype`` for an [n, k] weight, with finite scales: uint8 [n, row_bytes]."""
    return random_blocks_np(qtype, n, k, np.random.default_rng(seed))


def _padded_weight(b: np.ndarray) -> torch.Tensor:
    """``b`` as the middle rows of a buffer whose other bytes are 0xFF (a float16 NaN)."""
    buf = torch.full((b.shape[0] + 2 * PAD, b.shape[1]), 0xFF, dtype=torch.uint8)
    buf[PAD : PAD + b.shape[0]] = torch.from_numpy(b)
    return buf[PAD : PAD + b.shape[0]]


def _padded_rows(m: int, k: int, seed: int) -> torch.Tensor:
    buf = torch.full((m + 2 * PAD, k + 2 * PAD), float("nan"))
    x = buf[PAD : PAD + m, PAD : PAD + k]
    x.copy_(torch.randn(m, k, generator=torch.Generator().manual_seed(seed)))
    return x


CASES = [(q, m) for q in F16_FIELDS for m in (1, 3, 5, 20, 40)]  # 40: the GEMM's 32-row tile


@pytest.mark.parametrize("qtype,rows", CASES, ids=[f"{q.name}-{m}" for q, m in CASES])
def test_product_equals_gguf_py(cuda_pkg, qtype, rows):
    kernels, _ = cuda_pkg
    qk = quants.GGML_QUANT_SIZES[qtype][0]
    n, k = 37, (2 if qk == 256 else 9) * qk  # ragged: N not a multiple of a tile, K not of BLOCK_K
    b = _blocks(qtype, n, k, seed=rows)
    w = _padded_weight(b)
    x = _padded_rows(rows, k, seed=rows)
    want = x.double().numpy() @ quants.dequantize(b, qtype).astype(np.float64).T
    got = (kernels.gemv if rows <= kernels.GEMV_MAX_ROWS else kernels.gemm)(x, w, int(qtype), n)
    assert got.shape == (rows, n) and torch.isfinite(got).all()
    err = np.abs(got.double().numpy() - want).max() / np.abs(want).max()
    assert err < 1e-5, f"{qtype.name} × {rows} rows: {err:.2e}"


@pytest.mark.parametrize("qtype", list(F16_FIELDS), ids=lambda q: q.name)
def test_dequantize_is_gguf_py_to_the_bit(cuda_pkg, qtype):
    kernels, _ = cuda_pkg
    qk = quants.GGML_QUANT_SIZES[qtype][0]
    n, k = 21, 3 * max(qk, 128)  # K not a multiple of the 128-wide tile for the 32-weight types
    b = _blocks(qtype, n, k)
    got = kernels.dequantize(_padded_weight(b), int(qtype), n, k)
    assert np.array_equal(got.numpy(), quants.dequantize(b, qtype))


def test_operator_picks_a_kernel_by_rows_and_has_a_fake(cuda_pkg, monkeypatch):
    _, ops = cuda_pkg
    monkeypatch.setattr(ops, "DENSE_CHUNK", 64 * 256)  # W's 150 rows dequantised 64, 64, 22 at a time
    n, k = 150, 256
    b = _blocks(T.Q4_K, n, k)
    w = torch.from_numpy(b)
    ref = quants.dequantize(b, T.Q4_K).astype(np.float64)
    for rows in (1, 9, 300):  # the GEMV, the fused GEMM, dequantise + GEMM (in chunks of 64 rows of W)
        x = torch.randn(rows, k)
        got = torch.ops.nkat.gguf_mm(x, w, int(T.Q4_K), n)
        want = x.double().numpy() @ ref.T
        err = np.abs(got.double().numpy() - want).max() / np.abs(want).max()
        assert err < 1e-5, (rows, err)
    torch.library.opcheck(torch.ops.nkat.gguf_mm.default, (torch.randn(2, k), w, int(T.Q4_K), n),
                          test_utils=("test_schema", "test_faketensor"))


def test_tiny_model_on_the_kernels_equals_the_reference(cuda_pkg, tiny_model):
    """Every quantised weight of a tiny model (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) on the Triton kernels:
    the logits of a prefill and of a decode step equal the reference path's."""
    from nkat_runtime.loader import load_model

    path = tiny_model("qwen2")  # q/k/v biases too
    ref = load_model(path, device="cpu", context=32, progress=False, reference=True)
    tri = load_model(path, device="cpu", context=32, progress=False, kernels="triton", cache_types=("f32", "f32"))
    assert sum(type(m).__name__ == "GGUFLinear" for m in tri.model.modules()) >= 10
    assert not tri.model.batch_invariant  # the kernels' tiles follow the batch: said, not promised
    ids = torch.tensor([[1, 262, 260, 270, 265, 274]])
    with torch.no_grad():
        for tokens, pos in ((ids, torch.arange(6)), (ids[:, :1], torch.tensor([6]))):
            a, b = ref.model(tokens, pos), tri.model(tokens, pos)
            assert float((a - b).abs().max() / a.abs().max()) < 1e-5


def test_kernels_option_is_checked(tiny_model):
    from nkat_runtime.loader import load_model

    with pytest.raises(ValueError, match="kernels must be"):
        load_model(tiny_model("llama"), context=16, progress=False, kernels="gpu")


def test_kernels_compile_for_sm86_without_spills():
    """The two heaviest dequantisations (Q5_K, Q3_K), every kernel and tile, for sm_86 (an RTX 30xx:
    99 KB of shared memory a block); the slow tier compiles every type for sm_80-90."""
    reports = aot("--cc", "86", "--types", "Q5_K,Q3_K")
    assert {r["kernel"] for r in reports} == {"gemv", "gemm", "dequantize"}


def test_triton_on_a_cpu_needs_the_interpreter(tiny_model, monkeypatch):
    from nkat_runtime.errors import UnsupportedError
    from nkat_runtime.loader import load_model

    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(UnsupportedError, match="run on CUDA"):
        load_model(tiny_model("llama"), context=16, progress=False, kernels="triton")


def test_a_tied_head_shares_the_embeddings_bytes(cuda_pkg, tiny_model):
    from nkat_runtime.loader import load_model

    lm = load_model(tiny_model("gemma3"), device="cpu", context=16, progress=False, kernels="triton",
                    cache_types=("f32", "f32"))
    assert type(lm.model.output).__name__ == "GGUFLinear"
    assert lm.model.output.blocks.data_ptr() == lm.model.token_embd.table.data_ptr()
    ref = load_model(tiny_model("gemma3"), device="cpu", context=16, progress=False, reference=True)
    ids = torch.tensor([[1, 262, 270]])
    with torch.no_grad():
        a = ref.model(ids, torch.arange(3))
        b = lm.model(ids, torch.arange(3))
    assert float((a - b).abs().max() / a.abs().max()) < 1e-5
