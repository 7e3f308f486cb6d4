"""Triton kernels over GGUF bytes: a GEMV for a few rows, a fused GEMM for more, and a
dequantisation to a scratch matrix for prefill (then cuBLAS).

``y = x · Wᵀ`` with x float32 [M, K] and W a GGUF tensor's bytes [N, row_bytes] (``dequant.py``).
Every kernel accumulates in float32.

- ``gemv`` (M ≤ 8): one program per ``BLOCK_N`` output features and split of K; each weight tile is
  dequantised once and multiplied with all M rows (the weights are read once for the batch).
  Splits of K write partial sums that are added in a fixed order afterwards (no atomics: the
  result does not depend on scheduling).
- ``gemm`` (larger M): tiles of ``BLOCK_M`` × ``BLOCK_N``, the weight tile dequantised in
  registers and fed to ``tl.dot`` (TF32 on the tensor cores; exact under the interpreter).
- ``dequantize``: W as a dense matrix (float16/bfloat16/float32) for a cuBLAS GEMM.

Launch parameters are first guesses, to be replaced by what ``benchmarks/gpu_check.py`` measures on
a GPU (none was at hand when they were written). Importing this module needs triton, not a GPU;
under ``TRITON_INTERPRET=1`` (set before the import) the kernels run on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dequant import TYPES, weights
from .ops import GEMV_MAX_ROWS  # noqa: F401  (the one threshold; ops imports this module lazily)

#: tile shapes, chosen so that no kernel spills registers on sm_80–90 (``aot.py`` checks):
#: GEMV (BLOCK_N, BLOCK_K) by BLOCK_M (rows padded to a power of two)
GEMV_TILES = {1: (32, 64), 2: (32, 64), 4: (32, 64), 8: (16, 32)}
#: GEMM (BLOCK_N, BLOCK_K), and the BLOCK_M it takes (16 below 32 rows)
GEMM_TILE, GEMM_BLOCK_M = (64, 32), (16, 32)
#: dequantisation (BLOCK_N, BLOCK_K)
DEQUANT_TILE = (16, 128)
#: warps per program, per kernel
WARPS = {"gemv": 4, "gemm": 8, "dequantize": 4}


@triton.jit
def _gemv(x, w, out, M, N, K, row_bytes, k_per_split, stride_xm, stride_os, stride_om,
          QTYPE: tl.constexpr, QK: tl.constexpr, TS: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = split * k_per_split
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        wt = weights(w, rows, cols, row_bytes, N, K, QTYPE, QK, TS)  # [BN, BK]
        xt = tl.load(x + rm[:, None] * stride_xm + cols[None, :], mask=(rm[:, None] < M) & (cols[None, :] < K),
                     other=0.0).to(tl.float32)  # [BM, BK]
        acc += tl.sum(xt[:, None, :] * wt[None, :, :], axis=2)
    tl.store(out + split * stride_os + rm[:, None] * stride_om + rows[None, :], acc,
             mask=(rm[:, None] < M) & (rows[None, :] < N))


@triton.jit
def _gemm(x, w, out, M, N, K, row_bytes, stride_xm, stride_om,
          QTYPE: tl.constexpr, QK: tl.constexpr, TS: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # M·K and M·N may pass 2^31
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        wt = weights(w, rows, cols, row_bytes, N, K, QTYPE, QK, TS)  # [BN, BK]
        xt = tl.load(x + rm[:, None] * stride_xm + cols[None, :], mask=(rm[:, None] < M) & (cols[None, :] < K),
                     other=0.0).to(tl.float32)
        acc = tl.dot(xt, tl.trans(wt), acc, input_precision="tf32")
    tl.store(out + rm[:, None] * stride_om + rows[None, :], acc, mask=(rm[:, None] < M) & (rows[None, :] < N))


@triton.jit
def _dequantize(w, out, N, K, row_bytes, stride_o, QTYPE: tl.constexpr, QK: tl.constexpr, TS: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    wt = weights(w, rows, cols, row_bytes, N, K, QTYPE, QK, TS)
    tl.store(out + rows[:, None].to(tl.int64) * stride_o + cols[None, :], wt.to(out.dtype.element_ty),
             mask=(rows[:, None] < N) & (cols[None, :] < K))


def _check(w: torch.Tensor, qtype: int, n: int, k: int) -> tuple[int, int]:
    if qtype not in TYPES:
        raise ValueError(f"no Triton kernel for GGML type {qtype}")
    qk, ts = TYPES[qtype]
    if k % qk or w.dtype != torch.uint8 or tuple(w.shape) != (n, k // qk * ts) or not w.is_contiguous():
        raise ValueError(f"weight bytes {tuple(w.shape)} {w.dtype} do not hold [{n}, {k}] of type {qtype}")
    return qk, ts


def _pow2_at_least(n: int, floor: int = 1) -> int:
    return max(floor, 1 << (n - 1).bit_length())


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(1) == 1 else x.contiguous()  # rows may be strided (a view of a wider buffer)


def gemv(x: torch.Tensor, w: torch.Tensor, qtype: int, n: int, *, split_k: int | None = None) -> torch.Tensor:
    """float32 x [M ≤ 8, K] · Wᵀ → float32 [M, n]."""
    m, k = x.shape
    qk, ts = _check(w, qtype, n, k)
    x = _rows(x)
    block_m = _pow2_at_least(m)
    block_n, block_k = GEMV_TILES[block_m]
    tiles = triton.cdiv(n, block_n)
    if split_k is None:  # enough programs to fill a GPU's SMs when N is small
        split_k = max(1, min(8, 512 // tiles, triton.cdiv(k, 4 * block_k)))
    per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    split_k = triton.cdiv(k, per_split)
    part = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)
    _gemv[(tiles, split_k)](x, w, part, m, n, k, w.shape[1], per_split, x.stride(0), part.stride(0), part.stride(1),
                            QTYPE=qtype, QK=qk, TS=ts, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                            num_warps=WARPS["gemv"])
    return part[0] if split_k == 1 else part.sum(0)


def gemm(x: torch.Tensor, w: torch.Tensor, qtype: int, n: int) -> torch.Tensor:
    """float32 x [M, K] · Wᵀ → float32 [M, n], the weight dequantised tile by tile in registers."""
    m, k = x.shape
    qk, ts = _check(w, qtype, n, k)
    x = _rows(x)
    block_m = GEMM_BLOCK_M[0] if m < GEMM_BLOCK_M[1] else GEMM_BLOCK_M[1]
    block_n, block_k = GEMM_TILE
    out = torch.empty(m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _gemm[grid](x, w, out, m, n, k, w.shape[1], x.stride(0), out.stride(0),
                QTYPE=qtype, QK=qk, TS=ts, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                num_warps=WARPS["gemm"])
    return out


def dequantize(w: torch.Tensor, qtype: int, n: int, k: int, dtype: torch.dtype = torch.float32, *,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """W [n, k] as ``dtype`` (into ``out``, a scratch buffer of at least n·k, when given)."""
    qk, ts = _check(w, qtype, n, k)
    block_n, block_k = DEQUANT_TILE
    if out is not None and not out.is_contiguous():
        raise ValueError("dequantize: out must be contiguous")
    dst = torch.empty(n * k, dtype=dtype, device=w.device) if out is None else out
    dst = dst.view(-1)[: n * k].view(n, k)
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _dequantize[grid](w, dst, n, k, w.shape[1], dst.stride(0), QTYPE=qtype, QK=qk, TS=ts,
                      BLOCK_N=block_n, BLOCK_K=block_k, num_warps=WARPS["dequantize"])
    return dst
