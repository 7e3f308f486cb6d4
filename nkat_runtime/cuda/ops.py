"""``torch.ops.nkat.gguf_mm``: ``x · Wᵀ`` for a weight held as its GGUF bytes, and the layer around it.

The operator is a ``torch.library.custom_op`` with a fake (meta) kernel, so ``torch.compile`` and
CUDA graphs see one opaque node with a known output shape. By rows of activations:

- ``M ≤ GEMV_MAX_ROWS``: the Triton GEMV (``kernels.gemv``), weights read once for all rows;
- ``M < DENSE_FROM_ROWS``: the fused dequantise + ``tl.dot`` GEMM;
- more (prefill chunks): the weight dequantised into a float32 scratch matrix, then cuBLAS.

The thresholds are the CPU path's until a GPU measures its own (``benchmarks/gpu_check.py``).
On CPU tensors the operator runs the same Triton kernels under ``TRITON_INTERPRET=1`` (how the
tests check them) and otherwise gguf-py-exact dequantisation + ``F.linear`` (the reference).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from .. import quant
from ..gguf.reader import TensorRef
from ..model.fused import DENSE_FROM_ROWS

#: rows up to which the GEMV runs (vLLM's MMVQ takes ≤ 2–8, gemlite's GEMV 1)
GEMV_MAX_ROWS = 8
#: float32 weights dequantised at a time for a GEMM of many rows (64 MiB)
DENSE_CHUNK = 1 << 24


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@torch.library.custom_op("nkat::gguf_mm", mutates_args=())
def gguf_mm(x: torch.Tensor, w: torch.Tensor, qtype: int, n: int) -> torch.Tensor:
    """float32 x [M, K] · Wᵀ → float32 [M, n]; ``w`` is uint8 [n, row_bytes], the file's blocks."""
    m, k = x.shape
    if x.device.type == "cpu" and not _interpreted():
        return F.linear(x.float(), quant.dequantize(w, qtype, (n, k)))
    from . import kernels  # triton: imported only when a kernel runs

    x = x.float()
    if m <= GEMV_MAX_ROWS:
        return kernels.gemv(x, w, qtype, n)
    if m < DENSE_FROM_ROWS:
        return kernels.gemm(x, w, qtype, n)
    out = torch.empty(m, n, dtype=torch.float32, device=x.device)
    step = max(64, DENSE_CHUNK // k)  # a chunk of W's rows at a time: an LM head is GBs as float32
    scratch = torch.empty(min(step, n) * k, dtype=torch.float32, device=x.device)
    for r in range(0, n, step):
        rows = min(step, n - r)
        torch.mm(x, kernels.dequantize(w[r : r + rows], qtype, rows, k, out=scratch).T, out=out[:, r : r + rows])
    return out


@gguf_mm.register_fake
def _(x: torch.Tensor, w: torch.Tensor, qtype: int, n: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], n), dtype=torch.float32)


def triton_types() -> frozenset[int]:
    """The GGML types the kernels read (empty when triton is not installed)."""
    try:
        from .dequant import TYPES
    except Exception:  # noqa: BLE001  (no triton, or a broken install: the CPU kernels serve)
        return frozenset()
    return frozenset(TYPES)


class GGUFLinear(nn.Module):
    """``y = x·Wᵀ (+ b)`` with W kept as the file's bytes on the device: VRAM for a weight equals
    its size in the file. Not batch-invariant: the tile shapes (so the order of a row's sums)
    follow the number of rows (``rows_alone``, read by ``DecoderModel.batch_invariant``)."""

    rows_alone = False

    def __init__(self, ref: TensorRef, device: torch.device, bias: torch.Tensor | None = None,
                 blocks: torch.Tensor | None = None) -> None:
        """``blocks``: the bytes already on the device (a tied head shares its embedding's)."""
        super().__init__()
        self.out_features, self.in_features = ref.shape
        if blocks is None:
            blocks = ref.raw_tensor().view(self.out_features, -1).to(device=device, copy=True)
        self.register_buffer("blocks", blocks, persistent=False)
        self.qtype, self.type_name = int(ref.qtype), ref.type_name
        self.bias = None if bias is None else nn.Parameter(bias.float().to(device), requires_grad=False)
        self.file_bytes = ref.nbytes

    def extra_repr(self) -> str:
        return f"{self.in_features}→{self.out_features}, {self.type_name} blocks (Triton)"

    def weight_bytes(self) -> int:
        return self.blocks.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.nkat.gguf_mm(x.reshape(-1, self.in_features), self.blocks, self.qtype, self.out_features)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)
