"""Batch invariance under other instruction sets: the model-level check
(``tests/model/test_batch_invariance.py``) in a fresh process per setting."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from paths import TESTS

pytestmark = pytest.mark.slow
INVARIANCE = TESTS / "model" / "test_batch_invariance.py"


ISA_SETTINGS = [{"ATEN_CPU_CAPABILITY": "default"}, {"ATEN_CPU_CAPABILITY": "avx2"},
                {"ATEN_CPU_CAPABILITY": "avx512"}, {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
                {"MKL_ENABLE_INSTRUCTIONS": "AVX512"}, {"MKL_CBWR": "COMPATIBLE"}]


@pytest.mark.parametrize("setting", ISA_SETTINGS, ids=lambda s: "=".join(next(iter(s.items()))))
def test_isa_matrix(setting):
    """The real-model case in a fresh process under another instruction set (torch's kernels
    and MKL's are chosen at start-up). On AMD CPUs MKL ignores MKL_ENABLE_INSTRUCTIONS;
    MKL_CBWR=COMPATIBLE does switch its code path there. The scalar ``default`` capability is
    several times slower, so it runs the default model only (the one with every block type:
    Q4_K, Q5_0, Q6_K, Q8_0); the vector ones run all three."""
    env = {**os.environ, **setting}
    scalar = setting.get("ATEN_CPU_CAPABILITY") == "default"
    pick = "test_real_model_rows_are_batch_invariant and default-threads" + (" and gemma3" if scalar else "")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(INVARIANCE), "-k", pick],
                         env=env, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert f"{1 if scalar else 3} passed" in res.stdout, res.stdout[-2000:]
