"""The premise of batch-invariant decode (``nkat_runtime/model/linear.py``), checked on this CPU:
a row-local product gives each row the bits of that row's standalone 1-row product, batched or
alone, whatever the batch size, tile count and thread count; a plain GEMM need not."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nkat_runtime.model import linear

SHAPES = [(16, 576), (640, 2048), (2048, 640), (896, 4864), (1536, 1536), (4864, 896)]


@pytest.fixture(params=[1, 2, 3, 6], ids=lambda n: f"{n}-threads")
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("tile_bytes", [1 << 16, linear.TILE_BYTES], ids=["small-tiles", "default-tiles"])
def test_each_row_is_its_standalone_product(shape, tile_bytes, threads, monkeypatch):
    monkeypatch.setattr(linear, "TILE_BYTES", tile_bytes)
    g = torch.Generator().manual_seed(shape[0])
    w = torch.randn(shape, generator=g)
    x = torch.randn(9, shape[1], generator=g)
    alone = [linear.row_local_matmul(x[i : i + 1], w) for i in range(9)]
    for rows in (list(range(9)), [3, 4], [0, 2, 5, 6, 7, 8, 1, 4]):
        got = linear.row_local_matmul(x[rows], w)
        for j, i in enumerate(rows):
            assert torch.equal(got[j : j + 1], alone[i]), (rows, i)
    # and the same bits as the plain 1-row product (a GEMV call)
    for i in (0, 8):
        torch.testing.assert_close(alone[i], F.linear(x[i : i + 1], w), rtol=1e-5, atol=1e-4)


def test_rowwise_activation_is_each_rows_own():
    before = torch.get_num_threads()
    torch.set_num_threads(3)  # an odd share of the elements: scalar tails at thread boundaries
    try:
        x = torch.randn(16, 4864, generator=torch.Generator().manual_seed(1)) * 3
        act = lambda t: F.gelu(t, approximate="tanh")  # noqa: E731
        got = linear.rowwise(act, x)
        assert all(torch.equal(got[i : i + 1], act(x[i : i + 1])) for i in range(16))
    finally:
        torch.set_num_threads(before)
