"""The fast path's weights: GGUF tensors kept compact in memory after loading.

Per tensor type (``pack_linear``):

- Q4_0, Q4_1, Q4_K: torch's int4 kernel (``int4.py``), the 4-bit codes copied unchanged,
  ``S = d·sc``, ``Z = (8 - offset)·S - min``: exact up to bf16 rounding of S and Z;
  0.625 B/weight against the file's 0.5625 (Q4_K).
- Q5_0, Q5_1, Q5_K, Q8_0: the code c (5 or 8 bits, unsigned) split as ``c = 16h + l`` into
  two int4 parts whose outputs are summed: part L has codes l and ``S = s``, part H codes h
  and ``S = 16s``; the zeros carry the offset so that each is s times 0 or a power of two
  (Q5_0: -8s and 128s; Q8_0: 8s and 0), so the only rounding is that of s to bf16. A min
  (Q5_1, Q5_K) is added to part L's zero and rounded with it. 1.25 B/weight.
- Q6_K, Q3_K, Q2_K (scales per 16 weights, which the int4 kernel cannot take): the planes
  of their GGUF blocks (``quant/planes.py``), multiplied by fused kernels (``fused.py``) that
  dequantise inside the reduction, bit-exact with gguf-py per weight. So is any quantised
  tensor of a shape the int4 op refuses (rows not a multiple of 16).
- float tensors (F16/F32/BF16): dequantised once to float32.

Which form each type takes was chosen by measured figures (``docs/fast-path.md``,
``benchmarks/kernel_forms.py``): torch's int4 kernel reads its 0.625 B/weight at 17–21 GB/s on a
2-core EPYC and keeps most of that speed up to 4 rows, so two int4 parts beat the fused
kernel over byte codes for the 5- and 8-bit types (Q5_K 8960×1536, one row: 0.9 ms against
2.5 ms; 8 rows: 3.2 ms against 17 ms) at 1.25 against 1.06 B/weight; for Q6_K the fused
kernel is the only compact form, 1.07 B/weight against float32's 4.

Packed layers run their kernel for a few rows of activations (decode) and, for many rows
(prefill), dequantise their weight a tile at a time for a float32 GEMM. Embedding tables are
not copied at all: ``QuantEmbedding`` gathers the rows it needs from the memory-mapped file
and dequantises only those.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import quant
from ..gguf.reader import TensorRef
from ..quant import planes
from . import int4
from .fused import DENSE_FROM_ROWS, FusedLinear
from .linear import DenseLinear, is_decode

#: types packed for the int4 kernel, and into how many parts (4-bit codes: 1; 5- or 8-bit: 2)
INT4_PARTS = {"Q4_0": 1, "Q4_1": 1, "Q4_K": 1, "Q5_0": 2, "Q5_1": 2, "Q5_K": 2, "Q8_0": 2}


#: weight elements dequantised at a time on the dense path (bounds the temporary)
DENSE_CHUNK = 1 << 23


class Int4Linear(nn.Module):
    """``y = x·Wᵀ (+ b)`` with W held as one or two packed int4 parts (see module doc).

    A decode step (any batch size) and a few rows: the int4 kernel, bf16 activations; each output
    is one sequential sum over K, so a row's bits do not depend on the batch. Many rows (prefill, perplexity):
    W is dequantised from the memory-mapped file, a chunk of output rows at a time, for a
    float32 GEMM: the reference path's exact math, at a cost that many rows amortise.
    """

    def __init__(self, parts: list[tuple[torch.Tensor, torch.Tensor]], ref: TensorRef,
                 bias: torch.Tensor | None = None, release: Callable[[TensorRef], None] | None = None) -> None:
        super().__init__()
        for i, (packed, sz) in enumerate(parts):
            self.register_buffer(f"packed{i}", packed, persistent=False)
            self.register_buffer(f"sz{i}", sz, persistent=False)
        self.n_parts = len(parts)
        self.out_features, self.in_features = ref.shape
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)
        self.ref, self.release = ref, release
        self.dense_from_rows = DENSE_FROM_ROWS

    def extra_repr(self) -> str:
        return f"{self.in_features}→{self.out_features}, {self.ref.type_name} as {self.n_parts}× int4"

    def weight_bytes(self) -> int:
        """Bytes one pass over the packed weight reads."""
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] >= self.dense_from_rows and not is_decode(x):  # decode: always the row-local kernel
            y = self._dense(x2.float())
        else:
            x2 = x2.to(torch.bfloat16)
            y = int4.int4_mm(x2, self.packed0, self.sz0).float()
            if self.n_parts == 2:
                y = y + int4.int4_mm(x2, self.packed1, self.sz1).float()
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features).to(x.dtype)

    def _dense(self, x2: torch.Tensor) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        raw = self.ref.mapped_tensor().view(n, -1)
        y = torch.empty(x2.shape[0], n, dtype=torch.float32, device=x2.device)
        step = max(16, DENSE_CHUNK // k)
        for r in range(0, n, step):
            rows = raw[r : r + step]
            w = quant.dequantize(rows, self.ref.qtype, (rows.shape[0], k)).to(x2.device)
            y[:, r : r + rows.shape[0]] = F.linear(x2, w)
        if self.release is not None:
            self.release(self.ref)
        return y


def row_slice(ref: TensorRef, start: int, stop: int) -> TensorRef:
    """Rows ``start:stop`` of a 2-D tensor ``ref``, as a TensorRef of their own bytes."""
    row_bytes = ref.nbytes // ref.shape[0]
    return dataclasses.replace(ref, shape=(stop - start, *ref.shape[1:]), offset=ref.offset + start * row_bytes,
                               raw=ref.raw[start * row_bytes : stop * row_bytes])


def _split(ref: TensorRef, rows_raw: torch.Tensor, parts: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One row chunk's bytes → per part (codes uint8 [rows, K], scale, zero [rows, K/GROUP])."""
    h = quant.handler(ref.qtype)
    rows, k = rows_raw.shape[0], ref.shape[1]
    codes, scales, mins = h.unpack(rows_raw.reshape(-1, h.type_size))
    offset = h.code_offset
    if codes.dtype == torch.int8:  # Q8_0: make the codes unsigned
        codes = (codes.to(torch.int16) + 128).to(torch.uint8)
        offset += 128
    codes = codes.reshape(rows, k)
    per = h.group_size // int4.GROUP
    s = scales.reshape(rows, -1).repeat_interleave(per, dim=1)
    m = 0.0 if mins is None else mins.reshape(rows, -1).repeat_interleave(per, dim=1)
    if parts == 1:
        return [(codes, s, (8 - offset) * s - m)]
    # the offset goes where it keeps both zeros a power of two times s (exact after bf16
    # rounding of s); only a min (Q5_1, Q5_K) is rounded on its own, as in one-part types
    high = 128 if offset >= 128 else 0
    return [(codes & 0x0F, s, (8 - offset + high) * s - m), (codes >> 4, 16.0 * s, (128 - high) * s)]


def _int4_parts(ref: TensorRef, parts: int, device: torch.device,
                release: Callable[[TensorRef], None] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Unpack ``ref`` chunk by chunk into ``parts`` (packed codes, bf16 SZ) pairs.

    On the CPU each chunk is packed straight into preallocated outputs, so the temporaries
    stay at one chunk; CUDA packs the whole tensor at once (its layout is not row-local).
    """
    n, k = ref.shape
    rows_raw = ref.mapped_tensor().view(n, -1)
    on_cpu = device.type == "cpu"
    groups = k // int4.GROUP
    sz = [torch.empty(groups, n, 2, dtype=torch.bfloat16) for _ in range(parts)]
    codes = [torch.empty(n, k // 2 if on_cpu else k, dtype=torch.uint8) for _ in range(parts)]
    for r in range(0, n, int4.PACK_ROWS):
        chunk = rows_raw[r : r + int4.PACK_ROWS]
        stop = r + chunk.shape[0]
        for i, (c, scale, zero) in enumerate(_split(ref, chunk, parts)):
            codes[i][r:stop] = int4.pack_int4(c.contiguous(), device) if on_cpu else c
            sz[i][:, r:stop] = int4.scales_zeros(scale, zero, torch.device("cpu"))
        if release is not None:
            release(row_slice(ref, r, stop))
    if on_cpu:
        return list(zip(codes, sz))
    return [(int4.pack_int4(c, device), z.to(device)) for c, z in zip(codes, sz)]


#: types held as the planes of their blocks
PLANE_TYPES = planes.TYPES
#: file bytes split into planes at a time (bounds the temporaries)
PLANE_CHUNK_BYTES = 64 << 20


def plane_linear(ref: TensorRef, device: torch.device, bias: torch.Tensor | None = None,
                 release: Callable[[TensorRef], None] | None = None) -> FusedLinear:
    """``ref`` as a FusedLinear: its blocks split into planes, a chunk of rows at a time."""
    n, k = ref.shape
    h = quant.handler(ref.qtype)
    blocks = ref.mapped_tensor().view(n, k // h.block_size, h.type_size)
    step = max(1, PLANE_CHUNK_BYTES // max(1, blocks[0].numel()))
    out: planes.Planes = {}
    for r in range(0, n, step):
        stop = min(n, r + step)
        for name, part in planes.split(blocks[r:stop], ref.qtype).items():
            if name not in out:  # preallocated whole, so the peak is one chunk over the result
                out[name] = torch.empty((n, *part.shape[1:]), dtype=part.dtype)
            out[name][r:stop] = part
        if release is not None:
            release(row_slice(ref, r, stop))
    return FusedLinear({name: t.to(device) for name, t in out.items()}, ref.qtype, (n, k), ref.type_name, bias)


def int4_parts_for(ref: TensorRef) -> int:
    """How many int4 parts ``ref`` packs into (0: another form, see the module doc)."""
    parts = INT4_PARTS.get(ref.type_name, 0)
    if parts and len(ref.shape) == 2 and int4.int4_shape_ok(*ref.shape):
        return parts
    return 0


def pack_linear(ref: TensorRef, device: torch.device, bias: torch.Tensor | None = None,
                int4: bool = True, release: Callable[[TensorRef], None] | None = None) -> nn.Module:
    """The fast-path linear for a GGUF weight ``ref`` (see the module doc for the forms);
    ``release(ref)`` drops the file's pages after each use of them."""
    parts = int4_parts_for(ref) if int4 else 0
    if parts:
        layer: nn.Module = Int4Linear(_int4_parts(ref, parts, device, release), ref, bias, release)
    elif ref.qtype in PLANE_TYPES and len(ref.shape) == 2:
        layer = plane_linear(ref, device, bias, release)
    else:
        layer = DenseLinear(quant.dequantize(ref.raw_tensor(), ref.qtype, ref.shape).to(device), bias)
    layer.file_bytes = ref.nbytes  # what the file stores for this weight (bytes-per-token counts)
    return layer


def layout_of(layer: nn.Module) -> dict[str, torch.Tensor] | None:
    """The tensors a packed layer was built from (``layout_cache.py`` stores them), or None."""
    if isinstance(layer, Int4Linear):
        return {f"int4.{name}": t for name, t in layer.named_buffers()}
    if isinstance(layer, FusedLinear):
        return {f"planes.{name}": t for name, t in layer.planes.items()}
    return None


def from_layout(ref: TensorRef, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None = None,
                release: Callable[[TensorRef], None] | None = None) -> nn.Module | None:
    """The layer ``layout_of`` described, rebuilt without packing; None when it does not fit ``ref``."""
    forms = {name.partition(".")[0] for name in tensors}
    n = ref.shape[0]
    if forms == {"int4"}:
        parts = [(tensors.get(f"int4.packed{i}"), tensors.get(f"int4.sz{i}")) for i in range(2)]
        parts = [(p, z) for p, z in parts if p is not None and z is not None]
        if not parts or any(p.shape[0] != n or z.shape[1] != n for p, z in parts):
            return None
        layer: nn.Module = Int4Linear(parts, ref, bias, release)
    elif forms == {"planes"} and ref.qtype in PLANE_TYPES:
        found = {name.partition(".")[2]: t for name, t in tensors.items()}
        if any(t.shape[0] != n for t in found.values()):
            return None
        layer = FusedLinear(found, ref.qtype, (n, ref.shape[1]), ref.type_name, bias)
    else:
        return None
    layer.file_bytes = ref.nbytes
    return layer


class QuantEmbedding(nn.Module):
    """Token embedding looked up from the quantised table: only the used rows are dequantised.

    On the CPU the table stays a view of the memory-mapped file (no copy); on a GPU the
    quantised bytes are copied to the device once.
    """

    def __init__(self, ref: TensorRef, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        n, dim = ref.shape
        table = ref.mapped_tensor().view(n, -1)
        if device.type != "cpu":
            table = table.to(device)
        self.table = table  # not a buffer: .to() must never copy the map
        self.qtype, self.dim, self.dtype, self.device = ref.qtype, dim, dtype, device

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = self.table.index_select(0, tokens.reshape(-1).to(self.table.device))
        vectors = quant.dequantize(rows, self.qtype, (rows.shape[0], self.dim))
        return vectors.view(*tokens.shape, self.dim).to(device=self.device, dtype=self.dtype)


class DenseEmbedding(nn.Module):
    """Token embedding from a dense table (the reference path)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.table)


def set_dense_from_rows(model: nn.Module, rows: int) -> int:
    """Set on every packed layer the row count from which it takes the dense float32 path
    (a huge value keeps every pass on the int4 kernel, as decode runs); returns the count."""
    layers = [m for m in model.modules() if isinstance(m, (Int4Linear, FusedLinear))]
    for layer in layers:
        layer.dense_from_rows = rows
    return len(layers)
