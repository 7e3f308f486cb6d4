"""Calibration statistics a group of layers at a time: the groups a small budget makes give the
same statistics as one pass, shared inputs share one tensor, and the converter's θ does not
depend on how the passes were split."""

from __future__ import annotations

import torch

from nkat_runtime.gguf.reader import open_gguf
from nkat_runtime.gguf.requantize import requantize
from nkat_runtime.theta.calibrate import Calibration, calibration_groups
from nkat_runtime.theta.convert import BUILTIN_CALIBRATION, plan_targets, theta_svds

TEXT = BUILTIN_CALIBRATION.read_text(encoding="utf-8")


def test_groups_match_one_pass(tiny_model):
    path = tiny_model("llama", seed=0)
    targets = plan_targets(open_gguf(path), None)
    whole = list(calibration_groups(path, targets, Calibration(TEXT, 2, "second-moment", ctx=64)))
    assert len(whole) == 1 and set(whole[0]) == set(targets)
    one = whole[0]
    assert one["blk.0.attn_q.weight"] is one["blk.0.attn_v.weight"]
    assert one["blk.1.ffn_gate.weight"] is one["blk.1.ffn_up.weight"]
    small = list(calibration_groups(path, targets, Calibration(TEXT, 2, "second-moment", ctx=64, budget_bytes=1)))
    assert len(small) > 2  # one shared input per pass
    split = {t: s for group in small for t, s in group.items()}
    assert set(split) == set(targets)
    for t in targets:
        assert torch.equal(split[t], one[t]), t  # the same forward, the same sums
        assert split[t].shape[0] == split[t].shape[1]
        assert torch.allclose(split[t], split[t].T)


def test_theta_does_not_depend_on_the_split(tiny_model, tmp_path):
    fine = tiny_model("llama", seed=0)
    requantize(fine, tmp_path / "coarse.gguf", "Q4_0", progress=False)
    src, ref = open_gguf(tmp_path / "coarse.gguf"), open_gguf(fine)
    targets = plan_targets(src, None)

    def factors(budget: int) -> dict[str, torch.Tensor]:
        cal = Calibration(TEXT, 2, "second-moment", ctx=64, budget_bytes=budget)
        svds = theta_svds("residual", src, tmp_path / "coarse.gguf", targets, ref, cal, 4, progress=False)
        assert list(svds) == targets
        return {t: torch.matmul(*s.factors("residual", 4)) for t, s in svds.items()}

    one, split = factors(2**30), factors(1)
    for t in targets:
        assert torch.allclose(one[t], split[t], rtol=1e-4, atol=1e-6 * float(one[t].abs().max())), t
