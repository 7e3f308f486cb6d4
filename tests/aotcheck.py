"""Run ``nkat_runtime.cuda.aot`` (compile the Triton kernels for GPUs that are not here) from tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def aot(*args: str, timeout: int = 900) -> list[dict]:
    """``python -m nkat_runtime.cuda.aot ARGS`` without the interpreter: one report per kernel."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "nkat_runtime.cuda.aot", *args], env=env, capture_output=True,
                         text=True, timeout=timeout)
    reports = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert reports, res.stderr[-3000:]
    bad = [r for r in reports if r["problems"]]
    assert not bad and res.returncode == 0, json.dumps(bad)[:3000] + res.stderr[-2000:]
    return reports
