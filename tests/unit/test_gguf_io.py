"""The GGUF parser: equal to gguf-py's reader on real files; clean typed errors on bad
files; the CLIs turn them into one line and exit status 2."""

from __future__ import annotations

import subprocess
import sys

import gguf
import numpy as np
import pytest

from ggufgen import compare_with_gguf_py
from nkat_runtime.errors import ModelFormatError, UnsupportedError
from nkat_runtime.gguf.reader import open_gguf
from nkat_runtime.loader import load_model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_parser_equals_gguf_py_on_tiny(tiny_model, arch):
    compare_with_gguf_py(tiny_model(arch))


def test_truncated_file(tiny_model, tmp_path):
    src = tiny_model("llama").read_bytes()
    for cut in (10, 100, len(src) // 2, len(src) - 7):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(src[:cut])
        with pytest.raises(ModelFormatError):
            open_gguf(bad)


def test_not_gguf(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ModelFormatError, match="not a GGUF file"):
        open_gguf(bad)


def _write_arch(path, arch: str):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unsupported_architecture(tmp_path):
    with pytest.raises(UnsupportedError, match="architecture 'mamba' is not supported"):
        load_model(_write_arch(tmp_path / "m.gguf", "mamba"), progress=False)


def test_unsupported_tensor_type(tiny_model, tmp_path):
    """A tensor of a type we lack (IQ4_NL here) is named before anything is loaded."""
    src = tiny_model("llama")
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(tmp_path / "iq.gguf"), "llama")
    for f in r.fields.values():
        if f.name.startswith(("GGUF.", "general.architecture")):
            continue
        val = f.contents()
        vtype = f.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(f.name, val, vtype, sub_type=f.types[-1])
        else:
            w.add_key_value(f.name, val, vtype)
    for t in r.tensors:
        data, qtype = np.array(t.data), t.tensor_type
        if t.name == "blk.0.ffn_up.weight":
            rows = data.shape[0]
            data = np.zeros((rows, 64 // 32 * 18), dtype=np.uint8)  # IQ4_NL: 18 bytes / 32 weights
            qtype = gguf.GGMLQuantizationType.IQ4_NL
        w.add_tensor(t.name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedError, match="IQ4_NL"):
        load_model(tmp_path / "iq.gguf", progress=False)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("kind", ["truncated", "not_gguf", "unsupported_arch", "missing"])
def test_cli_errors_exit_2(kind, tiny_model, tmp_path):
    if kind == "truncated":
        path = tmp_path / "t.gguf"
        path.write_bytes(tiny_model("llama").read_bytes()[:5000])
    elif kind == "not_gguf":
        path = tmp_path / "n.gguf"
        path.write_text("hello, I am a text file\n" * 10)
    elif kind == "unsupported_arch":
        path = _write_arch(tmp_path / "a.gguf", "mamba")
    else:
        path = tmp_path / "does-not-exist.gguf"
    text = tmp_path / "t.txt"
    text.write_text("some text " * 100)
    for cmd in (("nkat_runtime.cli.generate", "--model", str(path)),
                ("nkat_runtime.cli.perplexity", "--model", str(path), "--file", str(text))):
        res = _cli(*cmd)
        assert res.returncode == 2, res.stderr
        lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in res.stderr, res.stderr
