"""Packed layouts kept on disk, so a second start of the same model skips the packing.

Packing a GGUF file for the fast path (int4 repacking, block planes) is the same work on
every start: Qwen2.5-Coder-1.5B spent about 4 s on it. The result depends on the file, the
torch build and the CPU (torch's int4 layout is its own), so it is stored under
``<NKAT cache>/layouts/`` keyed by all three and read back memory-mapped (``torch.load(mmap=
True)``): the pages come from the OS page cache as the kernels first touch them.

The key takes the file's path, size, modification time and a hash of its first MiB (the header,
metadata and tensor table), not a hash of the whole file (1 s per GB). One layout file is kept
per model path; a new one replaces it. Writing is atomic (a temporary file renamed into place);
a layout that cannot be written or read is reported once and the model packs as before.
``NKAT_LAYOUT_CACHE=0`` turns the cache off; ``NKAT_LAYOUT_CACHE=/some/dir`` moves it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

#: bump when a packed form changes, so old layouts are not read back
LAYOUT_VERSION = 1
HEADER_BYTES = 1 << 20


def layout_dir() -> Path | None:
    """Where layouts live, or None when ``NKAT_LAYOUT_CACHE`` turns the cache off."""
    setting = os.environ.get("NKAT_LAYOUT_CACHE", "").strip()
    if setting.lower() in ("0", "off", "false", "no"):
        return None
    if setting and setting != "1":
        return Path(setting)
    from ..bundled import cache_dir

    return cache_dir() / "layouts"


def layout_key(path: Path, device: torch.device, options: str) -> tuple[str, str]:
    """(per-path prefix, full key) for ``path`` packed for ``device`` with ``options``."""
    st = path.stat()
    with open(path, "rb") as fh:
        head = hashlib.sha256(fh.read(HEADER_BYTES)).hexdigest()
    cpu = torch.backends.cpu.get_cpu_capability() if device.type == "cpu" else device.type
    ident = f"{LAYOUT_VERSION}|{torch.__version__}|{cpu}|{options}|{st.st_size}|{st.st_mtime_ns}|{head}"
    prefix = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    return prefix, hashlib.sha256(ident.encode()).hexdigest()[:24]


class LayoutCache:
    """Packed tensors by weight name: read from a layout file, or collected to write one."""

    def __init__(self, folder: Path, prefix: str, key: str) -> None:
        self.folder, self.prefix = folder, prefix
        self.file = folder / f"{prefix}-{key}.pt"
        self.loaded: dict[str, dict[str, torch.Tensor]] = {}
        self.collected: dict[str, dict[str, torch.Tensor]] = {}
        if self.file.is_file():
            try:
                self.loaded = torch.load(self.file, mmap=True, weights_only=True)
            except Exception as exc:  # a damaged or foreign file: pack afresh and replace it
                log.warning("layout cache %s unreadable (%s): packing afresh", self.file, exc)

    @classmethod
    def open(cls, path: str | os.PathLike[str], device: torch.device, options: str) -> LayoutCache | None:
        folder = layout_dir()
        if folder is None or device.type != "cpu":  # CUDA packs on the device (not cached yet)
            return None
        try:
            prefix, key = layout_key(Path(path), device, options)
        except OSError:
            return None
        return cls(folder, prefix, key)

    @property
    def hit(self) -> bool:
        return bool(self.loaded)

    def get(self, name: str) -> dict[str, torch.Tensor] | None:
        return self.loaded.get(name)

    def put(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        if not self.loaded:
            self.collected[name] = tensors

    def save(self) -> None:
        """Write what was collected (only after a load that packed everything afresh)."""
        if self.loaded or not self.collected:
            return
        tmp = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".partial-", suffix=".pt")
            with os.fdopen(fd, "wb") as fh:
                torch.save(self.collected, fh)
            os.replace(tmp, self.file)
            tmp = None
            for old in self.folder.glob(f"{self.prefix}-*.pt"):  # one layout per model path
                if old != self.file:
                    old.unlink(missing_ok=True)
            log.info("packed layout cached in %s", self.file)
        except OSError as exc:
            log.warning("cannot write the layout cache %s: %s", self.file, exc)
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            self.collected = {}
