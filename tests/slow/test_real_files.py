"""Real model files through the tools: the GGUF parser against gguf-py on SmolLM2, the converter on
Gemma with a layer selection."""

from __future__ import annotations

import subprocess
import sys

import gguf
import numpy as np
import pytest

from ggufgen import compare_with_gguf_py
from nkat_runtime.gguf.reader import open_gguf

pytestmark = pytest.mark.slow


def test_parser_equals_gguf_py_on_smollm(model_path):
    compare_with_gguf_py(model_path("smollm2-135m"))


def test_converter_on_gemma_selective(model_path, tmp_path):
    """Gemma 3 270M, θ on two weights given in Meta and glob form: source bytes unchanged."""
    src = model_path("gemma3-270m")
    out = tmp_path / "g.nkat"
    res = subprocess.run([sys.executable, "-m", "nkat_runtime.cli.convert", "--input", str(src), "--output", str(out),
                          "--selective-layers", "layers.0.feed_forward.w1.weight", "blk.17.attn_*.weight",
                          "--check-chunks", "1"], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr
    assert "check on the built-in text" in res.stdout
    g = open_gguf(out)
    assert set(g.metadata["nkat.theta.targets"]) == {
        "blk.0.ffn_gate.weight", "blk.17.attn_k.weight", "blk.17.attn_output.weight", "blk.17.attn_q.weight",
        "blk.17.attn_v.weight"}
    s = open_gguf(src)
    for name, t in s.tensors.items():
        assert np.array_equal(g.tensors[name].raw, t.raw), name
    assert len(gguf.GGUFReader(out).tensors) == len(s.tensors) + 4 * 5
