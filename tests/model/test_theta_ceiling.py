"""benchmarks/theta_ceiling.py: the share of a layer's output error θ leaves, on a real (tiny)
model pair. The second-moment θ is the in-sample optimum, so no θ of that rank leaves less."""

from __future__ import annotations

import sys
from pathlib import Path

from nkat_runtime.gguf.requantize import requantize

sys.path.append(str(Path(__file__).resolve().parents[2] / "benchmarks"))  # after site-packages: a script must never shadow a package
from theta_ceiling import ceiling_rows  # noqa: E402

TEXT = "The quick brown fox jumps over the lazy dog. " * 40


def test_second_moment_is_the_in_sample_ceiling(tiny_model, tmp_path):
    fine = tiny_model("llama", seed=0)
    coarse = tmp_path / "coarse.gguf"
    requantize(fine, coarse, "Q4_0", progress=False)
    rows = ceiling_rows(fine, coarse, [0, 1], [2, 8], TEXT, chunks=2, ctx=32)
    # 7 block weights in each of 2 layers; those stored as Q4_0 are the same in both files
    assert 0 < len(rows) < 14
    for row in rows:
        shares = {k: v for k, v in row.items() if "/" in k}
        assert all(0.0 <= v <= 1.0 + 1e-6 for v in shares.values()), row
        for r in (2, 8):
            assert row[f"second-moment/{r}/in"] <= row[f"mean-abs/{r}/in"] + 1e-4, row
        for mode in ("mean-abs", "second-moment"):
            assert row[f"{mode}/8/in"] <= row[f"{mode}/2/in"] + 1e-4, row
