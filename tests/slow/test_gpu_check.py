"""``benchmarks/gpu_check.py`` runs where there is no GPU: ``--dry-run`` takes every stage at toy size
on the CPU (Triton interpreted) and checks the kernels' results; without it, it says there is no GPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from paths import REPO

pytestmark = pytest.mark.slow
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def _lines(*args: str) -> list[dict]:
    res = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


def test_dry_run_runs_every_stage(tmp_path):
    out = tmp_path / "gpu.jsonl"
    lines = _lines("--dry-run", "--out", str(out))
    assert [json.loads(line) for line in out.read_text().splitlines()] == lines
    by = {}
    for line in lines:
        by.setdefault(line["stage"], []).append(line)
    assert by["ceilings"] == [{"stage": "ceilings", "skipped": "no GPU"}]
    assert len(by["correctness"]) == 30 and all(r["ok"] for r in by["correctness"])
    assert {r["type"] for r in by["bandwidth"]} == {r["type"] for r in by["correctness"]}
    assert by["model_decode"][0]["tok_s"] > 0 and by["model_prefill"][0]["tok_s"] > 0
    assert not [r for r in lines if "error" in r] and by["done"] == [{"stage": "done", "ok": True}]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the real run is benchmarks/gpu_check.py")
def test_without_a_gpu_it_says_so():
    lines = _lines()
    assert lines[0]["stage"] == "env" and lines[-1]["skipped"].startswith("no GPU")
