"""The Triton kernels compiled for the GPUs users have, without a GPU: every type and tile for
sm_86 (RTX 30xx), the three heaviest types for sm_80 (A100), sm_89 (RTX 40xx) and sm_90 (H100/H200);
no register spills, shared memory within each device's limit (``nkat_runtime/cuda/aot.py``)."""

from __future__ import annotations

import pytest

from aotcheck import aot

pytestmark = pytest.mark.slow


def test_every_type_compiles_for_sm86():
    reports = aot("--cc", "86")  # the tightest shared memory (99 KB), 255 registers as everywhere
    assert len({r["type"] for r in reports}) == 10


def test_heaviest_types_compile_for_sm80_sm89_sm90():
    reports = aot("--cc", "80,89,90", "--types", "Q5_K,Q3_K,Q6_K")
    assert {r["cc"] for r in reports} == {80, 89, 90}
