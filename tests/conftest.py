"""Shared fixtures: the real models (assembled once into the NKAT cache), the shared text,
tiny generated GGUF files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nkat_runtime import bundled

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    return Path(os.environ.get("NKAT_SHARED_DIR") or REPO.parent / "shared")


def wiki_text_path() -> Path:
    return shared_dir() / "data" / "wiki_vital_en.txt"


@pytest.fixture(scope="session")
def wiki_text() -> str:
    path = wiki_text_path()
    if not path.is_file():
        pytest.skip(f"shared text not found at {path} (set NKAT_SHARED_DIR)")
    return path.read_text(encoding="utf-8")


REAL_MODELS = {
    "gemma3-270m": bundled.gemma3_270m,
    "qwen2.5-coder-0.5b": bundled.qwen25_coder_05b,
    "smollm2-135m": bundled.smollm2_135m,
}


@pytest.fixture(scope="session")
def model_path():
    """model_path(alias) -> Path of a real model, assembled once."""
    cache: dict[str, Path] = {}

    def get(alias: str) -> Path:
        if alias not in cache:
            cache[alias] = REAL_MODELS[alias]()
        return cache[alias]

    return get


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(arch) -> Path of a random-weight GGUF of that architecture."""
    from ggufgen import write_tiny_model

    made: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("tiny")

    def get(arch: str, **kw) -> Path:
        key = arch + repr(sorted(kw.items()))
        if key not in made:
            n_layer = 6 if arch == "gemma3" else 2  # gemma3: layer 5 is the first global layer
            made[key] = write_tiny_model(root / f"{arch}-{len(made)}.gguf", arch, n_layer=n_layer, **kw)
        return made[key]

    return get
