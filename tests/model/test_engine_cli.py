"""nkat-inference-engine and the converter on real files: keys, measured values, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from nkat_runtime.theta.convert import ConvertOptions, convert

GUIDE_BENCH_KEYS = {"tokens_per_second", "avg_latency_ms", "device", "theta_enabled", "overhead_percentage",
                    "prefill_tokens_per_second", "peak_memory_mb", "load_seconds"}
GUIDE_COMPARE_KEYS = {"nkat_tokens_per_second", "baseline_tokens_per_second", "overhead_percentage",
                      "estimated_perplexity_improvement", "perplexity_baseline", "perplexity_nkat",
                      "perplexity_change_percentage", "tpe_baseline", "tpe_nkat"}


def _engine(*args):
    res = subprocess.run([sys.executable, "-m", "nkat_runtime.cli.engine", *args],
                         capture_output=True, text=True, timeout=600)
    return res


@pytest.mark.slow  # two engine runs with perplexity: 22 s
def test_benchmark_and_compare_keys(tiny_model, tmp_path):
    out = tmp_path / "t.nkat"
    convert(ConvertOptions(input=tiny_model("llama"), output=out, rank=4, progress=False))
    res = _engine("--model", str(out), "--benchmark", "--seq-len", "32", "--iterations", "6",
                  "--json", str(tmp_path / "b.json"))
    assert res.returncode == 0, res.stderr
    bench = json.loads(res.stdout.strip().splitlines()[-1])
    assert GUIDE_BENCH_KEYS <= bench.keys() and bench["theta_enabled"] is True
    assert bench["tokens_per_second"] > 0 and bench["prefill_tokens_per_second"] > 0 and bench["peak_memory_mb"] > 0
    assert json.loads((tmp_path / "b.json").read_text()) == bench
    res = _engine("--model", str(out), "--compare", "--seq-len", "32", "--iterations", "6", "--eval-chunks", "1")
    assert res.returncode == 0, res.stderr
    cmp = json.loads(res.stdout.strip().splitlines()[-1])
    assert GUIDE_COMPARE_KEYS <= cmp.keys()
    assert cmp["perplexity_baseline"] > 1 and cmp["perplexity_nkat"] > 1
    want = (cmp["perplexity_nkat"] / cmp["perplexity_baseline"] - 1) * 100
    assert cmp["estimated_perplexity_improvement"] == pytest.approx(want, abs=1e-2)  # measured, not estimated
    assert "makes perplexity" in res.stderr


def test_compare_needs_theta(tiny_model):
    res = _engine("--model", str(tiny_model("llama")), "--compare", "--seq-len", "8", "--iterations", "2")
    assert res.returncode == 2 and "carries no θ" in res.stderr


