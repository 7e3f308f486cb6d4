"""``backend_selector.py --check``: the probe as a checklist, each failure with its fix."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from .launch import LaunchOptions, port_free
from .probe import Probe
from .rules import Decision


@dataclass
class Item:
    ok: bool
    what: str
    fix: str = ""
    required: bool = True  # a failure here means the chosen backend cannot start


def checklist(probe: Probe, decision: Decision | None, error: str, o: LaunchOptions) -> list[Item]:
    py_ok = sys.version_info >= (3, 11)
    items = [
        Item(py_ok, f"Python {probe.python}", "install Python 3.11 or newer"),
        Item(True, f"torch {probe.torch}" + (f", CUDA build {probe.torch_cuda}" if probe.torch_cuda else ", CPU build")),
    ]
    if probe.gpus:
        items += [Item(True, f"GPU {g.index}: {g.name}, {g.free_mb} of {g.total_mb} MiB free, "
                             f"compute capability {g.capability[0]}.{g.capability[1]}") for g in probe.gpus]
    else:
        fix = ("a CUDA build of torch is installed but sees no GPU: check the driver (nvidia-smi)" if probe.torch_cuda
               else "for a GPU, install a CUDA build of torch (pytorch.org); the CPU works as it is")
        items.append(Item(False, "no CUDA GPU", fix, required=False))
    c = probe.cpu
    isa = ", ".join(n for n, on in (("AVX2", c.avx2), ("AVX-512", c.avx512), ("AMX", c.amx)) if on) or "no AVX2"
    items.append(Item(True, f"CPU: {c.cores} cores, {c.ram_mb} MiB RAM, {isa}"))
    m = probe.model
    if m.error:
        items.append(Item(False, f"model {m.path}: {m.error}", "pass --model with a readable .gguf/.nkat file"))
    else:
        items.append(Item(not m.unsupported or probe.kobold.found,
                          f"model {m.path}: {m.kind}, {m.size_mb:.0f} MiB, {m.arch}, types {', '.join(m.tensor_types)}"
                          + (f"; NKAT lacks {', '.join(m.unsupported)}" if m.unsupported else ""),
                          "install Kobold.cpp for this model, or pick a supported one"))
    k = probe.kobold
    items.append(Item(k.found, f"Kobold.cpp: {' '.join(k.command)}" + (f" ({k.version})" if k.version else "")
                      if k.found else "Kobold.cpp not found",
                      "optional: install it (see the README) and pass --koboldcpp PATH or set "
                      "[selector] koboldcpp in config.toml", required=False))
    items.append(Item(port_free(o.host, o.port), f"port {o.port} on {o.host} free",
                      "stop the program that holds it, or pick another --port"))
    items.append(Item(decision is not None, f"backend: {decision.backend} on {decision.device}" if decision
                      else f"no backend: {error}", error))
    return items


def checklist_lines(items: list[Item]) -> list[str]:
    """The checklist as text, one item (and its fix, when it failed) per line."""
    lines = []
    for item in items:
        mark = "ok " if item.ok else ("FAIL" if item.required else "note")
        lines.append(f"[{mark:4}] {item.what}")
        if not item.ok and item.fix:
            lines.append(f"        → {item.fix}")
    return lines


def passed(items: list[Item]) -> bool:
    """True when nothing required failed."""
    return all(item.ok or not item.required for item in items)
