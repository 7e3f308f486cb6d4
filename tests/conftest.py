"""Shared fixtures: the real models (assembled once into the NKAT cache), the shared text,
tiny generated GGUF files, one inductor cache per run.

Tiers: ``python -m pytest -q`` runs everything not marked ``slow`` (unit/, model/, server/:
tiny generated models plus a few real-model smoke tests); ``python -m pytest -q -m slow`` runs
slow/ (real models against transformers and llama.cpp, 40-chunk perplexities, writers killed
mid-write, the long fuzz, the instruction-set matrix) and the tests marked ``slow`` where they
sit (the longer cases of a fast test: more models, more examples, whole optimiser studies).

With ``CI`` set, a test that would be skipped (a missing model, dependency, shared file or
reference) fails instead: CI must prove what it claims to run.
"""

from __future__ import annotations

import os
from pathlib import Path

# Triton kernels run under its interpreter, on CPU tensors (tests/unit/test_triton_kernels.py). The
# flag must be set before triton is first imported, and torch imports it when it is installed.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from nkat_runtime import bundled  # noqa: E402
from paths import wiki_text_path  # noqa: E402


def strict() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _skip_reason(longrepr) -> str:
    return longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if strict() and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI, which fails instead: {_skip_reason(report.longrepr)}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if strict() and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"module skipped under CI, which fails instead: {_skip_reason(report.longrepr)}"


@pytest.fixture(scope="session")
def wiki_text() -> str:
    path = wiki_text_path()
    if not path.is_file():
        pytest.skip(f"shared text not found at {path} (set NKAT_SHARED_DIR)")
    return path.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def hf_gguf_tokenizer():
    """hf_gguf_tokenizer(path) -> transformers' tokenizer read from the GGUF file, built once per
    run (for Gemma's 262k vocabulary it takes most of a minute): the tokenizer and logits
    reference tests share it."""
    cache: dict[Path, object] = {}

    def get(path: Path):
        if path not in cache:
            transformers = pytest.importorskip("transformers")
            cache[path] = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return cache[path]

    return get


@pytest.fixture(scope="session", autouse=True)
def layout_cache(tmp_path_factory):
    """Packed layouts of this run's loads go to a folder of the run (tests load many throwaway
    files), unless NKAT_LAYOUT_CACHE says otherwise; server children inherit it."""
    if "NKAT_LAYOUT_CACHE" in os.environ:
        yield None
        return
    folder = tmp_path_factory.mktemp("layouts")
    mp = pytest.MonkeyPatch()
    mp.setenv("NKAT_LAYOUT_CACHE", str(folder))
    yield folder
    mp.undo()


@pytest.fixture(scope="session")
def inductor_cache(tmp_path_factory):
    """One inductor cache for every compiling test of the run (kernels compiled once)."""
    folder = tmp_path_factory.mktemp("inductor")
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(folder))
    yield folder
    mp.undo()


REAL_MODELS = {
    "gemma3-270m": bundled.gemma3_270m,
    "qwen2.5-coder-0.5b": bundled.qwen25_coder_05b,
    "qwen2.5-coder-1.5b": bundled.qwen25_coder_15b,
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
