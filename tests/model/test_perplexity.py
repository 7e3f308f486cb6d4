"""Perplexity by llama.cpp's method: the method on a tiny model and the CLI's output (the figures
against llama.cpp's own llama-perplexity: ``tests/slow/test_perplexity_real.py``)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from nkat_runtime.eval.perplexity import perplexity_of_tokens
from nkat_runtime.loader import load_model


def test_method_on_tiny_model(tiny_model):
    """Chunks from an empty cache, first token → BOS, only the second half scored."""
    lm = load_model(tiny_model("llama"), context=16, progress=False)
    ids = torch.randint(3, lm.config.vocab_size, (50,), generator=torch.Generator().manual_seed(0)).tolist()
    res = perplexity_of_tokens(lm, ids, n_ctx=16)
    assert res.n_chunks == 3 and res.n_tokens_scored == 3 * 7
    nll = []
    for c in range(3):
        chunk = [lm.tokenizer.bos_id] + ids[c * 16 + 1 : (c + 1) * 16]
        logits = lm.model(torch.tensor([chunk]), torch.arange(16))[0].double()
        logp = torch.log_softmax(logits, -1)
        nll += [-float(logp[i, chunk[i + 1]]) for i in range(8, 15)]
    # rel 1e-6, not bits: the method runs the head on the scored half only (8 rows: the decode
    # kernels), this reference on all 16 (the prefill GEMM); a wrongly chosen token moves it by far more
    assert res.ppl == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-6)
    assert res.running[-1] == pytest.approx(res.ppl)
    mean = sum(nll) / len(nll)
    var = sum(x * x for x in nll) / len(nll) - mean * mean
    assert res.ppl_error == pytest.approx(math.sqrt(var / (len(nll) - 1)) * res.ppl, rel=1e-6)


def test_cli_output(tiny_model, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the and of is " * 400)
    out = tmp_path / "p.json"
    res = subprocess.run([sys.executable, "-m", "nkat_runtime.cli.perplexity", "--model", str(tiny_model("llama")),
                          "--file", str(text), "--ctx", "64", "--chunks", "3", "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[0].startswith("[1]") and lines[0].count("[") == 3
    assert lines[1].startswith("Final estimate: PPL = ")
    result = json.loads(lines[2])
    assert result["chunks"] == 3 and result["n_ctx"] == 64 and json.loads(out.read_text()) == result


