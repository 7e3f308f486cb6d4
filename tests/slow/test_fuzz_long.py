"""The long GGUF / .nkat mutation fuzz: 5,000 cases (``NKAT_FUZZ_LONG_CASES``; the fast tier runs 800), seed 7."""

from __future__ import annotations

import os

import pytest

from gguf_fuzz import campaign, fuzz_seeds

pytestmark = pytest.mark.slow
CASES = int(os.environ.get("NKAT_FUZZ_LONG_CASES", "5000"))


def test_long_fuzz_never_crashes_or_hangs(tiny_model, tmp_path):
    result = campaign(fuzz_seeds(tiny_model, tmp_path), CASES, seed=7)
    print(f"\nfuzz: {result.cases} cases, {result.loaded} loaded, {result.rejected} rejected, 0 crashes, "
          f"peak RSS {result.peak_rss_mb} MiB")
