"""Slot files: one slot's tokens and KV cache on disk and back (llama.cpp's ``POST
/slots/{id}?action=save|restore|erase``, files in the server's ``--slot-save-path`` folder).

Format, version 1, little-endian: ``b"NKATSLOT"``, u32 version, u32 header length H, u32 CRC-32 of
the header; the header, H bytes of UTF-8 JSON; then the KV data: for each layer, each plane of the
cache (the keys' planes, then the values': one for f32/f16/bf16, the int8 values and float16 scales
for q8_0), positions 0 .. n-1 as a C-order [H_kv, n, ...] array in the cache's own storage type
(bytes as the cache holds them, Hadamard rotation included). The header holds ``model`` (the
identity below), ``cache`` (types, layers, KV heads, head size, rotation sizes, rope factors, each
plane's dtype and per-position shape; the block size, recorded, is not checked: the data is per
position), ``n_tokens``, ``tokens``, ``exact`` (leading positions computed in place: shareable
blocks), ``data_bytes`` and ``data_crc32``.

A restore checks magic, version, header checksum, model identity, cache layout, token count and
ids (within the vocabulary and the context), the exact file size and the data checksum before it
touches the slot: a mismatch is a :class:`SlotFileError` naming what differs, the slot unchanged.
A save is atomic (``fsutil``: a temporary file beside the target, fsync, rename).

Model identity: SHA-256 of the GGUF's header (metadata and tensor infos: all before the tensor
data), 16 samples of 64 KiB spread over the tensor data and the file size, read once per loaded
model (the samples catch a fine-tune or requantisation of the same layout without hashing
gigabytes), plus the θ strength γ of a .nkat file's θ layers. The math path (reference or fast,
CPU or CUDA) is not part of it: its keys and values differ by rounding only.

Erase gives the slot's blocks back (no copy to the RAM prompt cache), unregisters the idle blocks
along its tokens' prefix chain (blocks another slot holds stay: that slot holds them) and drops the
RAM prompt cache entries that begin like the erased content (a block's worth of common prefix, or
all of it when shorter): a prompt that begins like it is computed again. Another conversation's
entry sharing a block-long prefix (a character card) may go too: it is recomputed when it returns.

Slot state is read and written in the engine thread (``Engine.call``, between scheduler steps);
file I/O and hashing run in worker threads.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import struct
import time
import weakref
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ..errors import InvalidRequestError, NKATError, ServerBusyError
from ..fsutil import publish, temp_beside
from ..loader import LoadedModel
from ..model.theta_linear import theta_layers
from .block_pool import NoBlocks
from .engine import Engine
from .kv_slots import Slot
from .scheduler import Scheduler
from .sequence import common_prefix

log = logging.getLogger(__name__)

MAGIC = b"NKATSLOT"
VERSION = 1
PREFIX = struct.Struct("<8sIII")  # magic, version, header length, header CRC-32
MAX_HEADER = 64 << 20
SAMPLES, SAMPLE_BYTES = 16, 64 << 10
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8}
BAD_CHARS = set(':*?"<>|/\\') | {"\uff0e", "\u2215", "\u2216"}


class SlotFileError(InvalidRequestError):
    """A slot file that cannot be restored here (bad name, corrupt, another model or cache)."""


class SlotFileMissing(NKATError):
    """No slot file of that name."""


class SlotBusyError(NKATError):
    """The slot is generating: it cannot be saved, restored or erased now."""


@dataclass
class SlotImage:
    tokens: list[int]
    exact: int
    kv: list[tuple[torch.Tensor, ...]]  # per layer, the planes [H_kv, n, ...] on the CPU (empty when n = 0)


def validate_filename(name: Any) -> str:
    """A plain file name inside the slot folder, by llama.cpp's ``fs_validate_filename`` rules."""
    if not isinstance(name, str) or not name:
        raise SlotFileError("'filename' is required: a plain file name such as \"slot0.bin\"", "filename")
    bad = (len(name.encode("utf-8", "surrogatepass")) > 255 or name in (".", "..") or ".." in name
           or name[0] == " " or name[-1] in " ." or any(c in BAD_CHARS or ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F
                                                        or 0xD800 <= ord(c) <= 0xDFFF for c in name))
    if bad:
        raise SlotFileError(f"invalid filename {name!r}: a plain file name is expected (no folders, no '..', "
                            "no control or reserved characters, at most 255 bytes)", "filename")
    return name


_identities: dict[int, tuple[weakref.ref, dict]] = {}


def model_identity(lm: LoadedModel) -> dict:
    """What a slot file must have been saved with (see the module doc); reads the file once."""
    hit = _identities.get(id(lm))
    if hit is None or hit[0]() is not lm:
        g = lm.gguf
        size = os.stat(g.path).st_size
        if g.mapping is not None and len(g.mapping) != size:
            raise SlotFileError(f"the model file {g.path.name} changed on disk since it was loaded: restart the server")
        h = hashlib.sha256(b"nkat-slot-model\0" + size.to_bytes(8, "little"))
        with open(g.path, "rb") as f:
            h.update(f.read(g.data_offset))
            span = max(0, size - g.data_offset - SAMPLE_BYTES)
            for i in range(SAMPLES):
                f.seek(g.data_offset + span * i // max(1, SAMPLES - 1))
                h.update(f.read(SAMPLE_BYTES))
        hit = (weakref.ref(lm), {"sha256": h.hexdigest(), "file_size": size, "file": g.path.name,
                                 "name": lm.name, "arch": lm.config.arch})
        _identities[id(lm)] = hit
    gammas = sorted({float(layer.gamma) for layer in theta_layers(lm.model)})
    return {**hit[1], "theta_gamma": gammas or None}


def cache_layout(lm: LoadedModel) -> dict:
    model, kv = lm.model, lm.model.kv
    assert kv is not None
    cfg = model.config
    rope = None
    if cfg.longrope and model.rope_factors:
        rope = "long" if cfg.rope_orig_ctx and model.max_seq > cfg.rope_orig_ctx else "short"
    planes = [{"dtype": str(p.dtype).removeprefix("torch."), "shape": [p.shape[1], *p.shape[4:]]}
              for p in (*kv.k.planes, *kv.v.planes)]
    return {"type_k": kv.k.kind, "type_v": kv.v.kind, "n_layer": len(kv.layers), "n_head_kv": cfg.n_head_kv,
            "head_dim": cfg.head_dim, "k_rot": kv.k_rot, "v_rot": kv.v_rot, "rope_factors": rope,
            "planes": planes, "block_size": kv.block_size}


def _plane_bytes(layout: dict, n: int) -> list[tuple[torch.dtype, tuple[int, ...], int]]:
    out = []
    for p in layout["planes"]:
        dtype = DTYPES[p["dtype"]]
        shape = (p["shape"][0], n, *p["shape"][1:])
        out.append((dtype, shape, int(torch.Size(shape).numel()) * torch.empty(0, dtype=dtype).element_size()))
    return out


# --- engine thread ---------------------------------------------------------------------------------
def idle_slot(sched: Scheduler, row: int) -> Slot:
    n = len(sched.slots)
    if not 0 <= row < n:
        raise InvalidRequestError(f"slot id {row} is out of range: this server has {n} slot(s), 0..{n - 1}", "id_slot")
    slot = sched.slots[row]
    if slot.busy or any(t.slot is slot for t in sched.active):
        raise SlotBusyError(f"slot {row} is busy generating; try again when it is idle")
    return slot


def snapshot(sched: Scheduler, row: int) -> SlotImage:
    """A CPU copy of what slot ``row`` holds."""
    slot = idle_slot(sched, row)
    n = len(slot.tokens)
    kv = [tuple(p.cpu() for p in planes) for planes in sched.lm.model.read_kv(slot.table, n)] if n else []
    return SlotImage(list(slot.tokens), min(slot.exact, n), kv)


def install(sched: Scheduler, row: int, image: SlotImage) -> None:
    """Slot ``row`` holds ``image`` (what it held goes to the RAM cache when worth it); unchanged
    when it is busy or the pool has no room now."""
    slot = idle_slot(sched, row)
    cache, pool = sched.cache, sched.pool
    n = len(image.tokens)
    need = pool.blocks_for(n)
    if not cache.make_room(need, keep=slot):  # every other idle slot gave its blocks back; and this one's?
        own = sum(pool.refs[b] == 1 for b in slot.table)
        if pool.available() + own < need:
            raise ServerBusyError(f"the KV pool has no room for {n} tokens now (running sequences hold it); "
                                  "try again")
    cache.replace(slot)
    try:
        pool.writable(slot.table, 0, n)
        dev = sched.lm.device
        sched.lm.model.write_kv(slot.table, [tuple(p.to(dev) for p in planes) for planes in image.kv], n)
    except NoBlocks:  # pragma: no cover - counted above
        cache.discard(slot)
        raise ServerBusyError(f"the KV pool has no room for {n} tokens now; try again") from None
    except BaseException:
        cache.discard(slot)
        raise
    slot.tokens, slot.exact = list(image.tokens), image.exact
    pool.register(slot.table, slot.tokens, slot.exact)
    slot.last_used = time.monotonic()
    log.info("slot %d: restored %d tokens from a slot file", row, n)


def erase(sched: Scheduler, row: int) -> int:
    """Forget what slot ``row`` holds (see the module doc); returns its token count."""
    slot = idle_slot(sched, row)
    tokens = list(slot.tokens)
    cache, pool = sched.cache, sched.pool
    cache.discard(slot)
    if tokens:
        pool.forget(pool.lookup(tokens, len(tokens)))
        need = min(len(tokens), pool.block_size)
        for key, entry in list(cache.ram.entries.items()):
            if common_prefix(entry.tokens, tokens) >= need:
                cache.ram.take(key)
    log.info("slot %d: erased (%d tokens)", row, len(tokens))
    return len(tokens)


# --- files (worker threads) ------------------------------------------------------------------------
def write_file(path: Path, image: SlotImage, identity: dict, layout: dict) -> int:
    """Write ``image`` to ``path`` atomically; returns the bytes written."""
    arrays = [p.contiguous().view(torch.uint8).numpy() for planes in image.kv for p in planes]
    crc = 0
    for a in arrays:
        crc = zlib.crc32(a, crc)
    meta = {"model": identity, "cache": layout, "n_tokens": len(image.tokens), "tokens": image.tokens,
            "exact": image.exact, "data_bytes": sum(a.nbytes for a in arrays), "data_crc32": crc,
            "saved_at": time.time()}
    head = pack_header(meta)
    tmp = temp_beside(path)
    try:
        with open(tmp, "wb") as f:
            f.write(head)
            for a in arrays:
                f.write(memoryview(a))
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return len(head) + meta["data_bytes"]


def pack_header(meta: dict) -> bytes:
    body = json.dumps(meta, separators=(",", ":")).encode("utf-8")
    return PREFIX.pack(MAGIC, VERSION, len(body), zlib.crc32(body)) + body


def read_header(f: BinaryIO, size: int, name: str) -> tuple[dict, int]:
    """The header of an open slot file of ``size`` bytes, and where its data begins."""
    raw = f.read(PREFIX.size)
    if len(raw) < PREFIX.size or raw[:8] != MAGIC:
        raise SlotFileError(f"{name} is not an NKAT slot file")
    _, version, n, crc = PREFIX.unpack(raw)
    if version != VERSION:
        raise SlotFileError(f"{name} has slot file format version {version}; this server reads version {VERSION}")
    if n > min(MAX_HEADER, size - PREFIX.size):
        raise SlotFileError(f"{name} is truncated or corrupt: its header is cut off")
    body = f.read(n)
    if zlib.crc32(body) != crc:
        raise SlotFileError(f"{name} is corrupt: its header's checksum does not match")
    try:
        meta = json.loads(body.decode("utf-8"))
    except ValueError:
        raise SlotFileError(f"{name} is corrupt: its header is not JSON") from None
    if not isinstance(meta, dict):
        raise SlotFileError(f"{name} is corrupt: its header is not an object")
    return meta, PREFIX.size + n


def _differences(got: Any, want: dict, keys: tuple[str, ...]) -> list[str]:
    got = got if isinstance(got, dict) else {}
    return [f"{k} {got.get(k)!r} (here {want.get(k)!r})" for k in keys if got.get(k) != want.get(k)]


def read_file(path: Path, identity: dict, layout: dict, vocab: int, context: int) -> tuple[SlotImage, int]:
    """The image in ``path`` after every check (module doc); returns it and the bytes read."""
    name = path.name
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise SlotFileMissing(f"no slot file {name!r} in the slot folder") from None
    except OSError as exc:
        raise SlotFileError(f"cannot read {name}: {exc.strerror or exc}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        meta, start = read_header(f, size, name)
        diff = _differences(meta.get("model"), identity, ("sha256", "file_size", "theta_gamma"))
        if diff:
            saved = meta.get("model") if isinstance(meta.get("model"), dict) else {}
            raise SlotFileError(f"{name} was saved with another model ({saved.get('file')!r}): "
                                f"{'; '.join(diff)}; this server runs {identity['file']}")
        diff = _differences(meta.get("cache"), layout, tuple(k for k in layout if k != "block_size"))
        if diff:
            raise SlotFileError(f"{name} was saved with another KV cache layout: {'; '.join(diff)}")
        tokens, n, exact = meta.get("tokens"), meta.get("n_tokens"), meta.get("exact")
        if not isinstance(tokens, list) or not isinstance(n, int) or len(tokens) != n \
                or not all(type(t) is int and 0 <= t < vocab for t in tokens):
            raise SlotFileError(f"{name} is corrupt: its token ids do not match its token count {n!r} "
                                f"or this model's vocabulary ({vocab})")
        if n > context:
            raise SlotFileError(f"{name} holds {n} tokens; this server's context holds {context}")
        if not isinstance(exact, int) or not 0 <= exact <= n:
            raise SlotFileError(f"{name} is corrupt: 'exact' {exact!r} is not within 0..{n}")
        planes = _plane_bytes(layout, n)
        want = layout["n_layer"] * sum(b for _, _, b in planes) if n else 0
        if meta.get("data_bytes") != want:
            raise SlotFileError(f"{name} is corrupt: it says {meta.get('data_bytes')!r} bytes of KV data for {n} "
                                f"tokens, {want} are expected")
        if size != start + want:
            raise SlotFileError(f"{name} is truncated: {size} bytes, {start + want} expected" if size < start + want
                                else f"{name} is corrupt: {size - start - want} bytes past its KV data")
        f.seek(start)
        kv, crc = [], 0
        for _ in range(layout["n_layer"] if n else 0):
            layer = []
            for dtype, shape, nbytes in planes:
                buf = bytearray(nbytes)
                if f.readinto(buf) != nbytes:
                    raise SlotFileError(f"{name} is truncated")
                crc = zlib.crc32(buf, crc)
                layer.append(torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(shape))
            kv.append(tuple(layer))
        if crc != meta.get("data_crc32"):
            raise SlotFileError(f"{name} is corrupt: its KV data's checksum does not match")
    return SlotImage(tokens, exact, kv), size


# --- the engine's side, for a route ----------------------------------------------------------------
async def save(engine: Engine, row: int, path: Path) -> tuple[int, int]:
    """Save slot ``row`` to ``path``: (tokens saved, bytes written)."""
    identity = await asyncio.to_thread(model_identity, engine.lm)
    image = await engine.call(lambda sched: snapshot(sched, row))
    written = await asyncio.to_thread(write_file, path, image, identity, cache_layout(engine.lm))
    log.info("slot %d: %d tokens saved to %s (%d bytes)", row, len(image.tokens), path.name, written)
    return len(image.tokens), written


async def restore(engine: Engine, row: int, path: Path) -> tuple[int, int]:
    """Restore slot ``row`` from ``path``: (tokens restored, bytes read)."""
    await engine.call(lambda sched: idle_slot(sched, row))  # busy or out of range: say so before reading
    lm = engine.lm
    identity = await asyncio.to_thread(model_identity, lm)
    image, nbytes = await asyncio.to_thread(read_file, path, identity, cache_layout(lm), lm.tokenizer.vocab_size,
                                            lm.context)
    await engine.call(lambda sched: install(sched, row, image))
    return len(image.tokens), nbytes


async def erase_slot(engine: Engine, row: int) -> int:
    """Erase slot ``row``: the tokens it held."""
    return await engine.call(lambda sched: erase(sched, row))
