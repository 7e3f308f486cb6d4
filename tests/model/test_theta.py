"""θ end to end on tiny models: the converter's output, the star-product linear, names,
and the converter's errors."""

from __future__ import annotations

import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch

from nkat_runtime import quant
from nkat_runtime.gguf.names import LayerNameError, select, to_gguf
from nkat_runtime.gguf.reader import open_gguf
from nkat_runtime.gguf.requantize import requantize
from nkat_runtime.loader import load_model
from nkat_runtime.model.theta_linear import ThetaLinear, set_theta_gamma, theta_layers
from nkat_runtime.theta.convert import ConvertOptions, convert
from nkat_runtime.theta.svd import moyal_factors, truncated_svd


def _convert(src, out, **kw):
    return convert(ConvertOptions(input=src, output=out, progress=False, **kw))


def _assert_source_copied(src_path, out_path):
    src, out = open_gguf(src_path), open_gguf(out_path)
    reader = gguf.GGUFReader(out_path)  # the file opens with gguf-py
    assert {t.name for t in reader.tensors} == set(out.tensors)
    for name, t in src.tensors.items():
        o = out.tensors[name]
        assert o.qtype == t.qtype and o.shape == t.shape
        assert np.array_equal(o.raw, t.raw), name  # byte for byte
    for key, value in src.metadata.items():
        assert out.metadata[key] == value, key
    return out


def test_names_mapping():
    assert to_gguf("layers.0.feed_forward.w1.weight") == "blk.0.ffn_gate.weight"
    assert to_gguf("layers.0.attention.wq.weight") == "blk.0.attn_q.weight"
    assert to_gguf("model.layers.3.mlp.down_proj.weight") == "blk.3.ffn_down.weight"
    assert to_gguf("blk.1.ffn_up") == "blk.1.ffn_up.weight"
    names = [f"blk.{i}.{w}.weight" for i in range(3) for w in ("attn_q", "ffn_gate", "ffn_down")]
    assert select(["layers.0.feed_forward.w1.weight"], names) == ["blk.0.ffn_gate.weight"]
    assert select(["blk.*.ffn_down.weight"], names) == [f"blk.{i}.ffn_down.weight" for i in range(3)]
    assert select(["layers.*.attention.wq.weight"], names) == [f"blk.{i}.attn_q.weight" for i in range(3)]
    with pytest.raises(LayerNameError, match="close matches: blk.0.ffn_gate.weight"):
        select(["blk.0.ffn_gat.weight"], names)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_moyal_round_trip(tiny_model, tmp_path, arch):
    src = tiny_model(arch)
    out = tmp_path / "m.nkat"
    res = _convert(src, out, rank=4, gamma=0.97)
    g = _assert_source_copied(src, out)
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # a normal file, not mkstemp's 0600
    assert g.metadata["nkat.theta.mode"] == "moyal" and g.metadata["nkat.theta.rank"] == 4
    assert abs(g.metadata["nkat.theta.gamma"] - 0.97) < 1e-6
    assert len(g.metadata["nkat.theta.targets"]) == len(res.targets) > 0
    # θ factors dequantise to the SVD result within INT8 error
    for name in g.metadata["nkat.theta.targets"]:
        w = quant.dequantize(g.tensors[name].raw_tensor(), g.tensors[name].qtype, g.tensors[name].shape)
        left, right = moyal_factors(w, truncated_svd(w, 4), 4)
        want = left @ right
        ref = g.tensors
        u = torch.from_numpy(np.array(ref[name + ".theta_u"].raw)).view(torch.int8).reshape(ref[name + ".theta_u"].shape)
        su = quant.dequantize(ref[name + ".theta_u_scale"].raw_tensor(), 0, ref[name + ".theta_u_scale"].shape)
        v = torch.from_numpy(np.array(ref[name + ".theta_v"].raw)).view(torch.int8).reshape(ref[name + ".theta_v"].shape)
        sv = quant.dequantize(ref[name + ".theta_v_scale"].raw_tensor(), 0, ref[name + ".theta_v_scale"].shape)
        got = (u.float() * su[:, None]) @ (v.float() * sv[:, None])
        # per-row int8 rounding: |Δ| ≤ half a step of each factor, propagated through the product
        bound = 0.5 * (su[:, None] * (v.float() * sv[:, None]).abs().sum(0)[None, :]
                       + (u.float() * su[:, None]).abs() @ sv[:, None].expand(-1, w.shape[1]))
        assert ((got - want).abs() <= bound + 1e-6).all(), name
        if w.shape[0] == w.shape[1]:  # antisymmetrised: k = 2r and θ = -θᵀ
            assert u.shape[1] == 8
            torch.testing.assert_close(want, -want.T, atol=1e-5, rtol=0)


def test_star_product_against_dense(tiny_model, tmp_path):
    """The loaded model's linear computes W·x + 0.5·γ·θ·x, checked in fp32 against a dense θ."""
    src = tiny_model("llama")
    out = tmp_path / "s.nkat"
    _convert(src, out, rank=4, gamma=0.5)
    lm = load_model(out, context=32, progress=False, theta_gamma=0.8, reference=True)
    layer = lm.model.linear_modules()["blk.1.ffn_down.weight"]
    assert isinstance(layer, ThetaLinear) and layer.gamma == pytest.approx(0.8)
    x = torch.randn(3, layer.base.in_features, dtype=torch.float64)
    theta = layer.theta_left.double() @ layer.theta_right.double()
    w = layer.source_weight().double()
    want = x @ w.T + 0.5 * 0.8 * x @ theta.T
    assert layer.folded  # dense base: θ folded into the weight
    torch.testing.assert_close(layer(x.float()).double(), want, rtol=1e-5, atol=1e-5)
    # the unfolded path (what a packed base runs) computes the same
    layer.folded = False
    layer.base.weight.data.copy_(w.float())
    torch.testing.assert_close(layer(x.float()).double(), want, rtol=1e-5, atol=1e-5)


def test_star_product_on_packed_weights(tiny_model, tmp_path):
    """On the fast path θ is not folded: the packed base plus two small matmuls, within
    the int4 kernel's bf16 rounding of the dense result."""
    from nkat_runtime.model.packed import Int4Linear

    out = tmp_path / "p.nkat"
    _convert(tiny_model("llama"), out, rank=4, gamma=0.5)
    lm = load_model(out, context=32, progress=False, theta_gamma=0.8)
    layer = lm.model.linear_modules()["blk.0.attn_q.weight"]  # Q4_0 in the tiny model
    assert isinstance(layer, ThetaLinear) and isinstance(layer.base, Int4Linear) and not layer.folded
    x = torch.randn(3, layer.base.in_features, generator=torch.Generator().manual_seed(0))
    theta = layer.theta_left @ layer.theta_right
    want = x @ layer.source_weight().T + 0.4 * x @ theta.T
    got = layer(x)
    assert (got - want).abs().max() <= 0.02 * want.abs().max()
    assert (x @ theta.T).abs().max() > 0.05 * want.abs().max()  # θ's share is far above the tolerance


def test_gamma_zero_and_no_theta_equal_source(tiny_model, tmp_path):
    src = tiny_model("qwen2")
    out = tmp_path / "z.nkat"
    _convert(src, out, rank=2)
    ids = torch.arange(3, 15).unsqueeze(0)
    pos = torch.arange(12)
    plain = load_model(src, context=32, progress=False).model(ids, pos)
    zero = load_model(out, context=32, progress=False, theta_gamma=0.0).model(ids, pos)
    off = load_model(out, context=32, progress=False, theta=False).model(ids, pos)
    on = load_model(out, context=32, progress=False)
    assert torch.equal(plain, zero) and torch.equal(plain, off)
    assert not torch.equal(plain, on.model(ids, pos))
    assert set_theta_gamma(on.model, 0.0) == len(theta_layers(on.model)) > 0
    assert torch.equal(plain, on.model(ids, pos))


def test_residual_mode_moves_toward_reference(tiny_model, tmp_path):
    """θ = SVD(2·(W_ref − W_q)): at γ = 1 the corrected weight is closer to the reference."""
    fine = tiny_model("llama", seed=0)
    requantize(fine, tmp_path / "coarse.gguf", "Q4_0", progress=False)
    out = tmp_path / "r.nkat"
    res = _convert(tmp_path / "coarse.gguf", out, rank=8, gamma=1.0, reference=fine, use_calibration=False)
    assert res.mode == "residual"
    lm = load_model(out, context=32, progress=False, reference=True)
    ref = open_gguf(fine)
    for name, layer in lm.model.linear_modules().items():
        w_ref = quant.dequantize(ref.tensors[name].raw_tensor(), ref.tensors[name].qtype, ref.tensors[name].shape)
        before = (layer.source_weight() - w_ref).norm()
        after = (layer.base.weight - w_ref).norm()  # γ = 1 folded in
        assert after < before if before > 0 else after == 0, name  # Q4_0 weights stay exact
    assert open_gguf(out).metadata["nkat.reference.sha256"]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "nkat_runtime.cli.convert", *args],
                          capture_output=True, text=True, timeout=300)


def test_selective_layers_meta_name(tiny_model, tmp_path):
    out = tmp_path / "sel.nkat"
    res = _cli("--input", str(tiny_model("llama")), "--output", str(out), "--no-check",
               "--selective-layers", "layers.0.feed_forward.w1.weight")
    assert res.returncode == 0, res.stderr
    assert open_gguf(out).metadata["nkat.theta.targets"] == ["blk.0.ffn_gate.weight"]


def test_converter_errors_exit_2_and_write_nothing(tiny_model, tmp_path):
    src = tiny_model("llama")
    other = tiny_model("llama", n_embd=96, n_ff=192)
    out = tmp_path / "bad.nkat"
    cases = [
        ["--input", str(src), "--output", str(out), "--selective-layers", "blk.0.ffn_gat.weight"],
        ["--input", str(src), "--output", str(out), "--reference", str(other)],
        ["--input", str(src), "--output", str(src)],
        ["--input", str(tmp_path / "missing.gguf"), "--output", str(out)],
        ["--input", str(src), "--output", str(out), "--reference", str(src), "--calibration-chunks", "0"],
    ]
    before = src.read_bytes()
    for args in cases:
        res = _cli(*args, "--no-check")
        assert res.returncode == 2, (args, res.stderr)
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("nkat-gguf-converter: error:"), res.stderr
        assert not out.exists()
        assert not list(tmp_path.glob("*.tmp"))
    assert src.read_bytes() == before


def test_globs_skip_norms_names_of_norms_are_errors(tiny_model, tmp_path):
    from nkat_runtime.theta.convert import ConvertError, plan_targets

    src = open_gguf(tiny_model("gemma3"))
    want = {f"blk.1.{n}.weight" for n in ("attn_q", "attn_k", "attn_v", "attn_output")}
    assert set(plan_targets(src, ["blk.1.attn_*.weight"])) == want  # the q/k norms are skipped
    with pytest.raises(ConvertError, match="not a 2-D weight matrix"):
        plan_targets(src, ["blk.1.attn_norm.weight"])


def test_dry_run_writes_nothing(tiny_model, tmp_path):
    out = tmp_path / "dry.nkat"
    res = _cli("--input", str(tiny_model("llama")), "--output", str(out), "--dry-run")
    assert res.returncode == 0 and "dry run: nothing written" in res.stdout and not out.exists()


def test_optimize_rank_picks_smallest_rank_reaching_the_energy(tiny_model, tmp_path):
    src = tiny_model("llama")
    res = _convert(src, tmp_path / "o.nkat", optimize_rank=True, energy_target=0.3, max_rank=8, mode="moyal")
    g = open_gguf(src)
    for t in res.targets:
        w = quant.dequantize(g.tensors[t.name].raw_tensor(), g.tensors[t.name].qtype, g.tensors[t.name].shape)
        svd = truncated_svd(w, 8)
        r = t.rank // 2 if w.shape[0] == w.shape[1] else t.rank  # square weights store 2r
        assert svd.energy_share(r) >= 0.3 or r == 8
        smaller = [q for q in (1, 2, 4, 6) if q < r]
        assert all(svd.energy_share(q) < 0.3 for q in smaller), t.name
    assert len({t.rank for t in res.targets}) > 1  # ranks differ per weight


def test_second_moment_and_byte_budget(tiny_model, tmp_path):
    """--activation-stats second-moment (QERA's whitening) and --theta-budget: the file loads, θ's
    bytes stay within the budget, and the budget's ranks differ by tensor."""
    from nkat_runtime.theta.ranks import rank_bytes

    fine = tiny_model("llama", seed=0)
    requantize(fine, tmp_path / "coarse.gguf", "Q4_0", progress=False)
    src = open_gguf(tmp_path / "coarse.gguf")
    shapes = [tuple(reversed(t.shape)) for n, t in src.tensors.items() if n.startswith("blk.") and len(t.shape) == 2]
    budget = sum(rank_bytes(s, 4) for s in shapes)
    res = _convert(tmp_path / "coarse.gguf", tmp_path / "b.nkat", rank=4, gamma=1.0, reference=fine,
                   activation="second-moment", budget_bytes=budget, max_rank=16)
    assert res.activation_aware and 0 < res.bytes_added <= budget
    assert len({t.rank for t in res.targets}) > 1
    lm = load_model(tmp_path / "b.nkat", context=32, progress=False)
    assert len(theta_layers(lm.model)) == len(res.targets)
    bad = _cli("-i", str(tmp_path / "coarse.gguf"), "-o", str(tmp_path / "x.nkat"), "--theta-budget", "0")
    assert bad.returncode == 2 and "--theta-budget" in bad.stderr and not (tmp_path / "x.nkat").exists()
