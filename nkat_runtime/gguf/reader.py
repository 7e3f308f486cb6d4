"""Read and validate GGUF / .nkat files, memory-mapped.

The header, metadata and tensor table are parsed here with ``struct`` over one
memory map and checked field by field against the file size before anything is
allocated (string and array lengths, tensor counts, dimensions, types, offsets,
alignment). Tensors stay views into the map until a handler dequantises or packs them.

gguf-py's ``GGUFReader`` parses the same files, but builds numpy objects per metadata
item: opening Gemma 3's 262,144-token vocabulary took ~10-20 s with it on this machine,
against well under a second here. Tests check this parser against ``GGUFReader``.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ModelFormatError

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4
MAX_KV = 1 << 20
MAX_TENSORS = 1 << 20
MAX_NAME = 1 << 16
DEFAULT_ALIGNMENT = 32

# GGUF value types: id -> (name, struct format or None)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NP = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class TensorRef:
    """One tensor in the file: its GGML type, logical shape (torch order) and raw bytes."""

    name: str
    qtype: int
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    raw: np.ndarray  # uint8 view into the memory map

    @property
    def type_name(self) -> str:
        from ..quant import type_name

        return type_name(self.qtype)

    @property
    def nbytes(self) -> int:
        return int(self.raw.size)

    def raw_tensor(self) -> torch.Tensor:
        """The raw bytes as a uint8 torch tensor (a copy: the memory map is read-only)."""
        return torch.from_numpy(np.array(self.raw, copy=True))

    def mapped_tensor(self) -> torch.Tensor:
        """The raw bytes as a uint8 torch tensor *without* a copy: a view of the read-only
        memory map. Read from it only (e.g. gather rows); writing would fault."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "the given NumPy array is not writable"
            return torch.from_numpy(self.raw)


@dataclass
class GGUFFile:
    """A parsed GGUF file: metadata as plain Python values, tensors by name."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorRef]
    data_offset: int
    alignment: int
    value_types: dict[str, tuple[int, int | None]] = field(default_factory=dict)  # key -> (type, array elem type)
    mapping: mmap.mmap | None = field(default=None, repr=False)

    def release(self, ref: TensorRef) -> None:
        """Drop ``ref``'s pages of the memory map from this process's resident set.

        The data stays in the OS page cache and is read back on the next access; loaders call
        this after copying a tensor into its final form, so the file is not counted twice.
        """
        advice = getattr(mmap, "MADV_DONTNEED", None)
        if self.mapping is None or advice is None or ref.nbytes == 0:
            return
        page = mmap.PAGESIZE
        start = ref.offset // page * page
        end = -(-(ref.offset + ref.nbytes) // page) * page
        end = min(end, len(self.mapping))
        try:
            self.mapping.madvise(advice, start, end - start)
        except (OSError, ValueError):  # best effort: a platform may refuse it
            pass

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelFormatError(f"{self.path}: metadata has no general.architecture")
        return arch

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def tensor(self, name: str) -> TensorRef:
        try:
            return self.tensors[name]
        except KeyError:
            raise ModelFormatError(f"{self.path}: tensor {name!r} is missing") from None

    def has_tensor(self, name: str) -> bool:
        return name in self.tensors

    def unsupported_types(self) -> dict[str, str]:
        """Tensor types this runtime cannot dequantise, each with one tensor that has it."""
        from ..quant import SUPPORTED_TYPES

        out: dict[str, str] = {}
        for name, t in sorted(self.tensors.items()):
            if t.qtype not in SUPPORTED_TYPES:
                out.setdefault(t.type_name, name)
        return out


class _Cursor:
    """Bounds-checked little-endian reads over a buffer."""

    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def fail(self, what: str) -> ModelFormatError:
        return ModelFormatError(f"{self.path}: {what} (at byte {self.pos}; file has {self.size} bytes)")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"truncated file: {what} needs {n} bytes")

    def scalar(self, fmt: str, what: str) -> Any:
        n = struct.calcsize("<" + fmt)
        self.need(n, what)
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, what: str) -> str:
        n = self.scalar("Q", what + " length")
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")

    def strings(self, count: int, what: str) -> list[str]:
        """``count`` strings in a row (a vocabulary: 262,144 for Gemma), as :meth:`string` reads them."""
        buf, pos, size, out = self.buf, self.pos, self.size, []
        length = _U64.unpack_from
        append = out.append
        for _ in range(count):
            if pos + 8 > size:
                self.pos = pos
                raise self.fail(f"truncated file: {what} length needs 8 bytes")
            (n,) = length(buf, pos)
            pos += 8
            if pos + n > size:
                self.pos = pos
                raise self.fail(f"truncated file: {what} needs {n} bytes")
            append(str(buf[pos : pos + n], "utf-8", "replace"))
            pos += n
        self.pos = pos
        return out

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            if depth > 0:
                raise self.fail(f"{what}: nested arrays are not supported")
            etype = self.scalar("I", what + " element type")
            count = self.scalar("Q", what + " count")
            if etype in _NP:
                size = np.dtype(_NP[etype]).itemsize
                self.need(count * size, what)
                arr = np.frombuffer(self.buf, dtype=_NP[etype], count=count, offset=self.pos)
                self.pos += count * size
                return arr.tolist()
            if etype == _STRING:
                if count > self.size - self.pos:  # every string takes at least 8 bytes
                    raise self.fail(f"{what}: {count} strings cannot fit in the file")
                return self.strings(count, what)
            raise self.fail(f"{what}: unknown array element type {etype}")
        raise self.fail(f"{what}: unknown value type {vtype}")


def _tensor_nbytes(path: Path, name: str, qtype: int, shape: tuple[int, ...]) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    except (ValueError, KeyError):
        raise ModelFormatError(f"{path}: tensor {name!r} has unknown type id {qtype}") from None
    if shape[-1] % block:
        raise ModelFormatError(f"{path}: tensor {name!r}: row length {shape[-1]} is not a multiple of the block size {block}")
    return int(np.prod(shape, dtype=np.int64)) // block * type_size


def open_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Parse and validate header, metadata and tensor table; tensors become memory-map views."""
    path = Path(path)
    if not path.is_file():
        raise ModelFormatError(f"{path}: no such file")
    size = path.stat().st_size
    if size < 24:
        raise ModelFormatError(f"{path}: not a GGUF file (only {size} bytes)")
    with open(path, "rb") as fh:
        if fh.read(4) != GGUF_MAGIC:
            raise ModelFormatError(f"{path}: not a GGUF file (bad magic)")
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    cur = _Cursor(memoryview(mm), path)
    cur.pos = 4
    version = cur.scalar("I", "version")
    if version not in SUPPORTED_VERSIONS:
        hint = " (a big-endian file?)" if version > 0xFFFF else ""
        raise ModelFormatError(f"{path}: GGUF version {version} is not supported{hint}")
    n_tensors = cur.scalar("Q", "tensor count")
    n_kv = cur.scalar("Q", "metadata count")
    if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
        raise cur.fail(f"implausible counts: {n_tensors} tensors, {n_kv} metadata entries")

    metadata: dict[str, Any] = {}
    value_types: dict[str, tuple[int, int | None]] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        vtype = cur.scalar("I", f"type of {key!r}")
        if key in metadata:
            raise cur.fail(f"duplicate metadata key {key!r}")
        elem = None
        if vtype == _ARRAY:
            cur.need(4, f"metadata {key!r}")
            (elem,) = struct.unpack_from("<I", cur.buf, cur.pos)
        metadata[key] = cur.value(vtype, f"metadata {key!r}")
        value_types[key] = (vtype, elem)

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ModelFormatError(f"{path}: general.alignment must be a power of two, got {alignment!r}")

    infos = []
    for i in range(n_tensors):
        name = cur.string(f"tensor #{i} name")
        if len(name) > MAX_NAME:
            raise cur.fail(f"tensor #{i} name is {len(name)} bytes long")
        n_dims = cur.scalar("I", f"tensor {name!r} n_dims")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (1..{MAX_DIMS} allowed)")
        dims = [cur.scalar("Q", f"tensor {name!r} dims") for _ in range(n_dims)]
        if any(d == 0 or d > 1 << 40 for d in dims) or int(np.prod(dims, dtype=np.float64)) > 1 << 44:
            raise cur.fail(f"tensor {name!r} has implausible dimensions {dims}")
        qtype = cur.scalar("I", f"tensor {name!r} type")
        offset = cur.scalar("Q", f"tensor {name!r} offset")
        infos.append((name, tuple(int(d) for d in reversed(dims)), qtype, offset))

    data_offset = -(-cur.pos // alignment) * alignment
    tensors: dict[str, TensorRef] = {}
    ranges = []
    for name, shape, qtype, offset in infos:
        if name in tensors:
            raise ModelFormatError(f"{path}: duplicate tensor name {name!r}")
        nbytes = _tensor_nbytes(path, name, qtype, shape)
        start = data_offset + offset
        if offset % alignment:
            raise ModelFormatError(f"{path}: tensor {name!r} offset {offset} is not aligned to {alignment}")
        if start + nbytes > size:
            raise ModelFormatError(
                f"{path}: tensor {name!r} needs bytes {start}..{start + nbytes}, file has {size} (truncated file?)"
            )
        raw = np.frombuffer(mm, dtype=np.uint8, count=nbytes, offset=start)
        tensors[name] = TensorRef(name, qtype, shape, start, raw)
        ranges.append((start, start + nbytes, name))
    ranges.sort()
    for (s0, e0, n0), (s1, _, n1) in zip(ranges, ranges[1:]):
        if s1 < e0:
            raise ModelFormatError(f"{path}: tensors {n0!r} and {n1!r} overlap")
    log.debug("opened %s: GGUF v%d, %d metadata keys, %d tensors", path, version, len(metadata), len(tensors))
    return GGUFFile(path, version, metadata, tensors, data_offset, alignment, value_types, mm)
