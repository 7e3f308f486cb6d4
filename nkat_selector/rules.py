"""The choice between this runtime and Kobold.cpp, from a ``Probe`` and the settings.

Rules, first match wins, each decision carrying its reasons:

1. a ``.nkat`` model → NKAT (only it knows θ), on the GPU when the model fits there;
2. an architecture or tensor type NKAT lacks → Kobold.cpp if present, else an error;
3. a GPU the model does not fit → Kobold.cpp with as many layers offloaded as fit, if
   present; else NKAT on the CPU;
4. otherwise the configured preference (``prefer``), NKAT when Kobold.cpp is absent.

A model "fits" a GPU when ``size × vram_factor + vram_headroom_mb`` ≤ its free memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .probe import GPU, Probe

BACKENDS = ("nkat", "koboldcpp")


class SelectionError(Exception):
    """No backend can serve this model here; the message says what to do."""


@dataclass
class Settings:
    prefer: str = "nkat"
    vram_factor: float = 1.2  # packed weights and buffers against the file size
    vram_headroom_mb: int = 1024  # KV cache, activations, the CUDA context
    kobold_path: str = ""


@dataclass
class Decision:
    backend: str  # "nkat" or "koboldcpp"
    device: str  # "cuda" or "cpu"
    gpu_layers: int = 0  # Kobold.cpp: layers offloaded (-1: all)
    reasons: list[str] = field(default_factory=list)


def needed_mb(probe: Probe, s: Settings) -> float:
    return probe.model.size_mb * s.vram_factor + s.vram_headroom_mb


def best_gpu(probe: Probe) -> GPU | None:
    return max(probe.gpus, key=lambda g: g.free_mb, default=None)


def decide(probe: Probe, s: Settings) -> Decision:
    if s.prefer not in BACKENDS:
        raise SelectionError(f"prefer must be one of {', '.join(BACKENDS)}, not {s.prefer!r}")
    m, kobold = probe.model, probe.kobold
    if m.error:
        raise SelectionError(f"cannot read the model: {m.error}")
    gpu = best_gpu(probe)
    need = needed_mb(probe, s)
    fits = gpu is not None and need <= gpu.free_mb
    gpu_note = (f"{gpu.name} has {gpu.free_mb} MiB free, the model needs about {need:.0f} MiB"
                if gpu is not None else "no CUDA GPU visible to torch")
    kobold_note = f"Kobold.cpp found ({' '.join(kobold.command)})" if kobold.found else "Kobold.cpp not found"

    if m.kind == "nkat":
        return Decision("nkat", "cuda" if fits else "cpu", reasons=[
            f"{m.path} is a .nkat file: only NKAT applies its θ tensors", gpu_note])
    if m.unsupported:
        lacks = ", ".join(m.unsupported)
        if kobold.found:
            return Decision("koboldcpp", "cuda" if gpu else "cpu", -1 if fits else _layers_that_fit(probe, s),
                            [f"NKAT does not support {lacks}", kobold_note, gpu_note])
        raise SelectionError(f"NKAT does not support {lacks}, and Kobold.cpp was not found: install it "
                             "(see the README) and pass --koboldcpp PATH, or pick another model")
    if gpu is not None and not fits:
        if kobold.found:
            layers = _layers_that_fit(probe, s)
            return Decision("koboldcpp", "cuda", layers, [
                gpu_note, f"{kobold_note}: partial offload of {layers} of {m.n_layer} layers"])
        return Decision("nkat", "cpu", reasons=[gpu_note, f"{kobold_note}: NKAT runs it on the CPU"])
    device = "cuda" if fits else "cpu"
    if s.prefer == "koboldcpp" and kobold.found:
        return Decision("koboldcpp", device, -1 if fits else 0, [gpu_note, kobold_note, "preference: koboldcpp"])
    reasons = [gpu_note, kobold_note, f"preference: {s.prefer}"]
    if s.prefer == "koboldcpp":
        reasons.append("Kobold.cpp is preferred but absent: NKAT instead")
    return Decision("nkat", device, reasons=reasons)


def _layers_that_fit(probe: Probe, s: Settings) -> int:
    """Kobold.cpp layers to offload: the share of the model the free VRAM holds."""
    gpu = best_gpu(probe)
    if gpu is None or probe.model.n_layer <= 0:
        return 0
    usable = max(0.0, gpu.free_mb - s.vram_headroom_mb)
    share = usable / max(1.0, probe.model.size_mb * s.vram_factor)
    return max(0, min(probe.model.n_layer, int(share * probe.model.n_layer)))
