"""What the selector knows about this machine and the model: plain dataclasses, filled by
``probe()`` (fast: the GGUF header is parsed, no tensor is read) or by tests."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class GPU:
    index: int
    name: str
    total_mb: int
    free_mb: int
    capability: tuple[int, int] = (0, 0)


@dataclass
class CPU:
    cores: int
    ram_mb: int
    avx2: bool = False
    avx512: bool = False
    amx: bool = False


@dataclass
class ModelInfo:
    path: str
    kind: str  # "gguf" or "nkat"
    size_mb: float
    arch: str = ""
    n_layer: int = 0
    tensor_types: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)  # what this runtime lacks (arch / types)
    error: str = ""  # the file could not be read


@dataclass
class Kobold:
    command: list[str] = field(default_factory=list)  # empty: not found
    version: str = ""

    @property
    def found(self) -> bool:
        return bool(self.command)


@dataclass
class Probe:
    python: str
    torch: str
    torch_cuda: str  # torch's CUDA build ("" for a CPU build)
    gpus: list[GPU]
    cpu: CPU
    model: ModelInfo
    kobold: Kobold


def probe_gpus() -> tuple[str, str, list[GPU]]:
    import torch

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            props = torch.cuda.get_device_properties(i)
            gpus.append(GPU(i, props.name, total // 2**20, free // 2**20, (props.major, props.minor)))
    return torch.__version__, torch.version.cuda or "", gpus


def probe_cpu() -> CPU:
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    except (ValueError, OSError, AttributeError):
        ram = 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return CPU(cores, ram, "avx2" in flags, "avx512f" in flags, any(f.startswith("amx") for f in flags))


def probe_model(path: str | os.PathLike[str]) -> ModelInfo:
    """Header, architecture and tensor types of a .gguf/.nkat file, without its tensors."""
    from nkat_runtime.errors import NKATError
    from nkat_runtime.gguf.reader import open_gguf
    from nkat_runtime.model import ARCHITECTURES

    p = Path(path)
    kind = "nkat" if p.suffix.lower() == ".nkat" else "gguf"
    size = p.stat().st_size / 2**20 if p.is_file() else 0.0
    info = ModelInfo(str(p), kind, size)
    try:
        g = open_gguf(p)
        info.arch = g.architecture
    except NKATError as exc:
        info.error = str(exc)
        return info
    if g.get("nkat.version") is not None:
        info.kind = "nkat"
    info.n_layer = int(g.get(f"{info.arch}.block_count", 0) or 0)
    info.tensor_types = sorted({t.type_name for t in g.tensors.values()})
    if info.arch not in ARCHITECTURES:
        info.unsupported.append(f"architecture {info.arch}")
    else:  # what the loader would refuse before reading a weight: experts, keys, unknown tensors
        from nkat_runtime.errors import UnsupportedError
        from nkat_runtime.model import config_for
        from nkat_runtime.model.checks import check_supported

        embd = g.tensors.get("token_embd.weight")
        try:
            cfg = config_for(info.arch, g.metadata, max(1, embd.shape[0] if embd is not None else 1))
            check_supported(cfg, g.metadata, g.tensors)
        except UnsupportedError as exc:
            info.unsupported.append(str(exc))
        except NKATError as exc:
            info.error = str(exc)
    info.unsupported += [f"tensor type {name}" for name in sorted(g.unsupported_types())]
    return info


def find_kobold(explicit: str | None = None, configured: str | None = None) -> Kobold:
    """Kobold.cpp from ``--koboldcpp``, config.toml, or ``koboldcpp``/``koboldcpp.py`` on PATH."""
    for candidate in (explicit, configured, shutil.which("koboldcpp"), shutil.which("koboldcpp.py")):
        if not candidate:
            continue
        path = Path(candidate).expanduser()
        if not path.is_file():
            continue
        command = [sys.executable, str(path)] if path.suffix == ".py" else [str(path)]
        return Kobold(command, kobold_version(command))
    return Kobold()


def kobold_version(command: list[str]) -> str:
    try:
        out = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[-1].strip() if out.returncode == 0 and lines else ""


def probe(model_path: str, kobold_path: str | None = None, kobold_configured: str | None = None) -> Probe:
    torch_version, torch_cuda, gpus = probe_gpus()
    return Probe(platform.python_version(), torch_version, torch_cuda, gpus, probe_cpu(),
                 probe_model(model_path), find_kobold(kobold_path, kobold_configured))
