"""θ refined by distillation (theta/distill.py, the converter's --distill-steps): it starts from
exactly the model the per-layer θ gives, and training lowers the KL to the reference on chunks it
never saw."""

from __future__ import annotations

import torch

from nkat_runtime.gguf.reader import open_gguf
from nkat_runtime.gguf.requantize import requantize
from nkat_runtime.loader import load_model
from nkat_runtime.model.theta_linear import theta_layers
from nkat_runtime.theta import distill as ds
from nkat_runtime.theta.convert import BUILTIN_CALIBRATION, ConvertError, ConvertOptions, convert
from nkat_runtime.theta.factors import ThetaFactors


def _pair(tiny_model, tmp_path, arch="llama"):
    fine = tiny_model(arch, seed=3)
    coarse = tmp_path / "coarse.gguf"
    requantize(fine, coarse, "Q4_0", progress=False)
    return fine, coarse


def _theta_file(fine, coarse, out, **kw):
    return convert(ConvertOptions(input=coarse, output=out, rank=4, gamma=1.0, reference=fine, progress=False,
                                  calibration_chunks=2, **kw))


def _plain_theta(tiny_model, tmp_path):
    """The tiny pair, a per-layer θ file of it (loaded) and that file's factors by target."""
    fine, coarse = _pair(tiny_model, tmp_path)
    out = tmp_path / "r.nkat"
    _theta_file(fine, coarse, out)
    lm = load_model(out, context=64, progress=False, reference=True)
    names = {id(m): n for n, m in lm.model.linear_modules().items()}
    factors = {names[id(m)]: ThetaFactors.from_dense(m.theta_left, m.theta_right) for m in theta_layers(lm.model)}
    return fine, coarse, lm, factors


def test_start_is_the_files_model(tiny_model, tmp_path):
    """The trainable form of a file's θ gives the logits the runtime gives the file."""
    fine, coarse, lm, f = _plain_theta(tiny_model, tmp_path)
    student = load_model(coarse, context=64, progress=False, reference=True, theta=False)
    ds.attach(student.model, f, 1.0)
    ds.bypass_cache(student.model)
    tokens = torch.randint(1, 200, (1, 48), generator=torch.Generator().manual_seed(0))
    want = lm.model(tokens, torch.arange(48))[0]
    got = ds.chunk_logits(student.model, tokens)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


def test_distillation_lowers_held_out_kl(tiny_model, tmp_path):
    fine, coarse, _, f = _plain_theta(tiny_model, tmp_path)
    text = BUILTIN_CALIBRATION.read_text(encoding="utf-8")[:20000]
    new, report = ds.distill(coarse, fine, f, 1.0, text, ds.DistillOptions(steps=30, ctx=64, positions=32,
                                                                          lr=0.05), progress=False)
    assert set(new) == set(f)
    print(f"held-out KL {report.kl_before:.5f} -> {report.kl_after:.5f}")
    assert report.kl_after < 0.9 * report.kl_before, report
    assert len(report.losses) == 30 and all(x == x for x in report.losses)


def test_converter_distils_and_marks_the_file(tiny_model, tmp_path):
    fine, coarse = _pair(tiny_model, tmp_path)
    out = tmp_path / "d.nkat"
    res = _theta_file(fine, coarse, out, distill_steps=3)
    assert res.output == out and len(res.targets) > 0
    meta = open_gguf(out).metadata
    assert meta["nkat.theta.distill_steps"] == 3
    assert meta["nkat.theta.mode"] == "residual"
    lm = load_model(out, context=64, progress=False)
    assert len(theta_layers(lm.model)) == len(res.targets)


def test_converter_refuses_distillation_without_reference(tiny_model, tmp_path):
    fine, coarse = _pair(tiny_model, tmp_path)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    for kw in ({"reference": None, "mode": "moyal"}, {"distill_text": tmp_path / "missing.txt"},
               {"distill_text": tmp_path / "latin1.txt"}, {"distill_text": BUILTIN_CALIBRATION, "distill_steps": -1}):
        opts = dict(input=coarse, output=tmp_path / "x.nkat", rank=4, gamma=1.0, reference=fine, progress=False,
                    distill_steps=2)
        opts.update(kw)
        try:
            convert(ConvertOptions(**opts))
        except ConvertError:
            pass
        else:
            raise AssertionError(f"accepted {kw}")
        assert not (tmp_path / "x.nkat").exists()


def test_cli_prints_and_records_the_distillation(tiny_model, tmp_path):
    import json
    import subprocess
    import sys

    fine, coarse = _pair(tiny_model, tmp_path)
    out, js = tmp_path / "c.nkat", tmp_path / "c.json"
    run = subprocess.run([sys.executable, "-m", "nkat_runtime.cli.convert", "-i", str(coarse), "-o", str(out),
                          "--reference", str(fine), "--theta-rank", "4", "--theta-gamma", "1", "--distill-steps", "2",
                          "--no-check", "--json", str(js)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "distillation: 2 steps" in run.stdout
    d = json.loads(js.read_text())["distill"]
    assert d["steps"] == 2 and d["held_out_kl_before"] > 0 and d["held_out_kl_after"] > 0
