"""Assembling bundled models from chunk packages: joined in order, checked, never half-written."""

from __future__ import annotations

import hashlib

import pytest

from nkat_runtime import bundled
from nkat_runtime.errors import ModelNotFoundError


def _parts(tmp_path, chunks: list[bytes]):
    paths = []
    for i, data in enumerate(chunks):
        p = tmp_path / f"part{i:02d}.bin"
        p.write_bytes(data)
        paths.append(p)
    return paths


def test_chunks_join_in_order_and_check_sha256(tmp_path):
    chunks = [b"GGUF" + bytes(range(256)) * 300, b"second", b"third" * 1000]
    target = tmp_path / "model.gguf"
    digest = hashlib.sha256(b"".join(chunks)).hexdigest()
    assert bundled._copy_chunks(_parts(tmp_path, chunks), target, "test", sha256=digest) == target
    assert target.read_bytes() == b"".join(chunks)


def test_a_wrong_sha256_leaves_no_file(tmp_path):
    target = tmp_path / "model.gguf"
    with pytest.raises(ModelNotFoundError, match="sha256"):
        bundled._copy_chunks(_parts(tmp_path, [b"abc", b"def"]), target, "test", sha256="0" * 64)
    assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part00.bin", "part01.bin"]


def test_a_missing_chunk_package_names_it():
    with pytest.raises(ModelNotFoundError, match="no-such-model-part1"):
        bundled._chunk_files("no-such-model", 3)


def test_every_alias_resolves_by_name():
    assert {"gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "smollm2-135m"} <= set(bundled.ALIASES)
