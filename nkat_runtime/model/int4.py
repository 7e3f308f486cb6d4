"""Weight-only int4 matmul: torch's "tinygemm" ops on CPU and CUDA, behind one interface.

A packed weight holds 4-bit codes ``q`` (0..15) in the op's own layout and, per group of
``GROUP`` input columns, a bf16 scale ``S`` and zero ``Z``: ``w = (q - 8)·S + Z``. The
activations are bf16 (the CPU op's only vectorised path); the result is bf16.

- CPU: ``aten._convert_weight_to_int4pack_for_cpu`` (int32 [N, K] codes, an ISA-specific
  interleave of 64-row blocks on AVX-512, 32 on AVX2) and ``aten._weight_int4pack_mm_for_cpu``.
  The layout depends on the CPU, so packing happens at load and is never cached on disk.
- CUDA: ``aten._convert_weight_to_int4pack`` (uint8 [N, K/2], ``q[2i] << 4 | q[2i+1]``, inner
  k-tiles 2/4/8) and ``aten._weight_int4pack_mm``. Not yet run on a GPU by this project.
"""

from __future__ import annotations

import torch

GROUP = 32
#: rows packed per call by ``packed.py``: bounds the int32 temporary (a multiple of every
#: ISA's block width, so chunks packed apart concatenate to the whole tensor's layout)
PACK_ROWS = 4096


def int4_shape_ok(out_features: int, in_features: int) -> bool:
    """Whether an [N, K] weight fits the ops (N % 16, K % GROUP, and CUDA's K % 32)."""
    return out_features % 16 == 0 and in_features % GROUP == 0 and in_features >= GROUP


def _cuda_inner_k_tiles(in_features: int) -> int:
    for tiles in (8, 4, 2):
        if in_features % (tiles * 16) == 0:
            return tiles
    raise ValueError(f"in_features {in_features} does not fit CUDA int4 tiles")


def pack_int4(codes: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 codes [N, K] (values 0..15, on the CPU) → the op's packed weight on ``device``.

    On the CPU the op takes an int32 copy of its input: callers pack in row chunks."""
    n, k = codes.shape
    if device.type == "cuda":
        pairs = codes.view(n, k // 2, 2)
        packed = ((pairs[..., 0] << 4) | pairs[..., 1]).contiguous().to(device)
        return torch.ops.aten._convert_weight_to_int4pack(packed, _cuda_inner_k_tiles(k))
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1).to(device)


def scales_zeros(scale: torch.Tensor, zero: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Per-group float32 scale/zero [N, K/GROUP] → the ops' bf16 [K/GROUP, N, 2] tensor."""
    sz = torch.stack((scale, zero), dim=-1).transpose(0, 1).contiguous()
    return sz.to(device=device, dtype=torch.bfloat16)


def int4_mm(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
    """bf16 x [M, K] · Wᵀ → bf16 [M, N] for a packed W."""
    if x.device.type == "cuda":
        return torch.ops.aten._weight_int4pack_mm(x, packed, GROUP, sz)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, sz)


def int4_available(device: torch.device) -> bool:
    """Whether this torch build has the int4 ops for ``device`` (checked with a tiny pack)."""
    try:
        codes = torch.zeros(16, GROUP * 4, dtype=torch.uint8)
        packed = pack_int4(codes, device)
        sz = scales_zeros(torch.ones(16, 4), torch.zeros(16, 4), device)
        int4_mm(torch.zeros(1, GROUP * 4, dtype=torch.bfloat16, device=device), packed, sz)
        return True
    except (RuntimeError, NotImplementedError, AttributeError, ValueError):
        return False
