"""Batch invariance under other instruction sets: the model-level check
(``tests/model/test_batch_invariance.py``) in a fresh process per setting."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from paths import TESTS

pytestmark = pytest.mark.slow
INVARIANCE = TESTS / "model" / "test_batch_invariance.py"


def _intel() -> bool:
    try:
        return "GenuineIntel" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


# MKL reads MKL_ENABLE_INSTRUCTIONS on Intel CPUs only: elsewhere those runs would repeat the native one
ISA_SETTINGS = [{"ATEN_CPU_CAPABILITY": "default"}, {"ATEN_CPU_CAPABILITY": "avx2"},
                {"ATEN_CPU_CAPABILITY": "avx512"}, {"MKL_CBWR": "COMPATIBLE"}]
if _intel():
    ISA_SETTINGS += [{"MKL_ENABLE_INSTRUCTIONS": "AVX2"}, {"MKL_ENABLE_INSTRUCTIONS": "AVX512"}]


@pytest.mark.parametrize("setting", ISA_SETTINGS, ids=lambda s: "=".join(next(iter(s.items()))))
def test_isa_matrix(setting):
    """The real-model case in a fresh process under another instruction set (torch's kernels
    and MKL's are chosen at start-up). On AMD CPUs MKL ignores MKL_ENABLE_INSTRUCTIONS (those cases run on Intel only);
    MKL_CBWR=COMPATIBLE does switch its code path there. Every setting runs the default model
    (the one with every block type: Q4_K, Q5_0, Q6_K, Q8_0); AVX2, the vector set a native
    AVX-512 run does not take, runs all three (the other two are marked slow in that file, so
    the child selects both tiers)."""
    env = {**os.environ, **setting}
    if setting == {"ATEN_CPU_CAPABILITY": "default"}:  # scalar kernels: several times slower; one decode step
        env["NKAT_INVARIANCE_STEPS"] = "1"
    every = setting == {"ATEN_CPU_CAPABILITY": "avx2"}
    pick = "test_real_model_rows_are_batch_invariant and default-threads" + ("" if every else " and gemma3")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(INVARIANCE), "-k", pick,
                          "-m", "slow or not slow"],
                         env=env, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert f"{3 if every else 1} passed" in res.stdout, res.stdout[-2000:]
