"""θ over a shared input in one pass (``model/theta_fused.py``): q/k/v and gate/up share the
right product; the result equals each target run alone and the dense formula, keeps a decode
row's bits its own, follows γ per target, and is rebuilt when a linear is replaced."""

from __future__ import annotations

import pytest
import torch

from nkat_runtime.loader import load_model
from nkat_runtime.model.linear import DenseLinear
from nkat_runtime.model.theta_fused import SharedTheta, set_theta_fusion
from nkat_runtime.model.theta_linear import ThetaLinear, set_theta_gamma, theta_layers
from nkat_runtime.theta.convert import ConvertOptions, convert
from nkat_runtime.theta.factors import ThetaFactors


@pytest.fixture(scope="module")
def nkat(tiny_model, tmp_path_factory):
    """A tiny llama .nkat with θ (moyal, rank 4: 8 on square weights) on every block weight."""
    out = tmp_path_factory.mktemp("fused") / "t.nkat"
    convert(ConvertOptions(tiny_model("llama"), out, rank=4, gamma=0.9, progress=False))
    return out


class _FirstInput(torch.nn.Module):
    """A stand-in base whose output row is its input row's first value (exact, no reduction)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.out_features = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., :1].expand(*x.shape[:-1], self.out_features).contiguous()


def _targets(k_in: int, outs: tuple[int, ...], ranks: tuple[int, ...], seed: int = 0,
             dense: bool = True) -> list[ThetaLinear]:
    """ThetaLinears over dense bases (no restore: θ runs from the input, as over packed weights)."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for n, r in zip(outs, ranks):
        base = DenseLinear(torch.randn(n, k_in, generator=g) / k_in**0.5) if dense else _FirstInput(n)
        f = ThetaFactors.from_dense(torch.randn(n, r, generator=g) * 0.1, torch.randn(r, k_in, generator=g) * 0.1)
        layers.append(ThetaLinear(base, f, 0.8))
    return layers


def _decode(lm, tokens: torch.Tensor, pos: int) -> torch.Tensor:
    rows = list(range(tokens.shape[0]))
    return lm.model(tokens[:, pos : pos + 1], torch.full((len(rows), 1), pos), rows=rows)[:, -1]


def test_fused_model_equals_each_target_alone(nkat):
    lm = load_model(nkat, context=32, max_batch=3, progress=False)
    unfolded = lambda *ms: sum(isinstance(m, ThetaLinear) and not m.folded for m in ms)  # noqa: E731
    groups = [(b.attn.attn_q, b.attn.attn_k, b.attn.attn_v) for b in lm.model.layers]
    groups += [(b.ffn.ffn_gate, b.ffn.ffn_up) for b in lm.model.layers]
    assert any(unfolded(*g) < len(g) for g in groups)  # the tiny model mixes folded (F16/F32) weights in
    assert set_theta_fusion(lm.model, True) == sum(unfolded(*g) >= 2 for g in groups) >= 2
    tokens = torch.randint(3, 200, (3, 10), generator=torch.Generator().manual_seed(0))
    results = {}
    for on in (True, False):
        set_theta_fusion(lm.model, on)
        prefill = torch.cat([lm.model(tokens[b : b + 1, :8], torch.arange(8), rows=[b]) for b in range(3)])
        results[on] = (prefill, _decode(lm, tokens, 8), _decode(lm, tokens, 9))
    for fused, alone in zip(results[True], results[False]):
        assert float((fused - alone).abs().max()) <= 1e-5 * float(alone.abs().max())
    set_theta_gamma(lm.model, 0.0)  # θ off: the base model, whether grouped or not
    plain = load_model(nkat, context=32, max_batch=3, progress=False, theta=False)
    ids = tokens[:1, :8]
    assert torch.equal(lm.model(ids, torch.arange(8)), plain.model(ids, torch.arange(8)))


def test_group_against_the_dense_formula_and_per_target_gamma():
    layers = _targets(96, (64, 32, 32), (8, 4, 8))
    group = SharedTheta.of(layers)
    assert group is not None and group.right_t.shape == (1, 96, 20) and group.ranks == (8, 4, 8)
    stack = group.right_t[0].t()
    assert [m.theta_right.data_ptr() for m in layers] == [stack[j].data_ptr() for j in (0, 8, 12)]  # views
    x = torch.randn(5, 1, 96, generator=torch.Generator().manual_seed(1))

    def want(m: ThetaLinear) -> torch.Tensor:
        x64 = x.double()
        return x64 @ m.base.weight.double().T + 0.5 * m.gamma * x64 @ (m.theta_left.double() @ m.theta_right.double()).T

    for rows in (x, x.view(5, 96), x.view(1, 5, 96)):  # a decode step (row-local), and rows of a prefill
        got = group(rows)
        for m, y in zip(layers, got):
            torch.testing.assert_close(y.double(), want(m).view(y.shape), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(y, m(rows), rtol=1e-6, atol=1e-6)  # as the target alone
    layers[1].set_gamma(0.0)
    layers[2].set_gamma(-1.5)
    got = group(x)
    assert torch.equal(got[1], layers[1].base(x))  # γ = 0: exactly the base output
    for m, y in zip(layers, got):
        torch.testing.assert_close(y.double(), want(m), rtol=1e-5, atol=1e-5)


def test_no_group_for_folded_or_single_targets(nkat, tiny_model):
    ref = load_model(nkat, context=32, progress=False, reference=True)  # dense: θ folded, nothing to group
    assert all(t.folded for t in theta_layers(ref.model)) and set_theta_fusion(ref.model, True) == 0
    a, b = _targets(64, (32, 32), (4, 4))
    assert SharedTheta.of([a, b.base]) is None  # one θ target: nothing shared
    wide = _targets(80, (32,), (4,))[0]
    assert SharedTheta.of([a, wide]) is None  # not one input


@pytest.mark.parametrize("threads", [1, 2, 3, 6])
@pytest.mark.parametrize("shape", [(640, (1024, 256, 256)), (1536, (8960, 8960)), (8960, (1536, 1536))],
                         ids=["qkv-640", "gate-up-1536", "k-8960"])
def test_a_decode_row_gets_its_standalone_bits(shape, threads):
    k_in, outs = shape
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        layers = _targets(k_in, outs, (8,) * len(outs), seed=k_in, dense=False)
        group = SharedTheta.of(layers)
        x = torch.randn(9, 1, k_in, generator=torch.Generator().manual_seed(2))
        alone = [group(x[i : i + 1]) for i in range(9)]
        for rows in (list(range(9)), [3, 4], [0, 2, 5, 6, 7, 8, 1, 4]):
            got = group(x[rows])
            for j, i in enumerate(rows):
                assert all(torch.equal(g[j : j + 1], a) for g, a in zip(got, alone[i])), (rows, i)
    finally:
        torch.set_num_threads(before)


def test_replacing_a_linear_regroups(tiny_model):
    """As the optimiser installs θ: ThetaLinears put in one by one (``replace_linear``) end up in one group."""
    lm = load_model(tiny_model("llama"), context=32, progress=False)
    model = lm.model
    assert set_theta_fusion(model, True) == 0
    names = [f"blk.0.{n}.weight" for n in ("attn_q", "attn_k", "attn_v")]
    bases = {n: model.linear_modules()[n] for n in names}
    x = torch.randn(2, 1, bases[names[0]].in_features, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(4)
    for name, base in bases.items():
        f = ThetaFactors.from_dense(torch.randn(base.out_features, 4, generator=g) * 0.1,
                                    torch.randn(4, base.in_features, generator=g) * 0.1)
        model.replace_linear(name, ThetaLinear(base, f, 1.0))
    attn = model.layers[0].attn
    group = attn.theta_qkv
    assert group is not None and group.serves((attn.attn_q, attn.attn_k, attn.attn_v))
    want = [m(x) for m in (attn.attn_q, attn.attn_k, attn.attn_v)]
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-6) for a, b in zip(group(x), want))
    attn.attn_v = bases[names[2]]  # set without replace_linear: the stale group is not used
    assert not group.serves((attn.attn_q, attn.attn_k, attn.attn_v))


def test_triton_kernels_with_fused_theta(nkat):
    """The CUDA path's linears (Triton kernels, under the interpreter) with θ grouped: the same
    logits as θ folded into the reference path's dense weights."""
    pytest.importorskip("triton")
    ref = load_model(nkat, device="cpu", context=32, progress=False, reference=True)
    tri = load_model(nkat, device="cpu", context=32, progress=False, kernels="triton", cache_types=("f32", "f32"))
    assert set_theta_fusion(tri.model, True) >= 2
    assert type(theta_layers(tri.model)[0].base).__name__ == "GGUFLinear"
    ids = torch.tensor([[1, 262, 260, 270, 265, 274]])
    with torch.no_grad():
        for tokens, pos in ((ids, torch.arange(6)), (ids[:, :1], torch.tensor([6]))):
            a, b = ref.model(tokens, pos), tri.model(tokens, pos)
            assert float((a - b).abs().max() / a.abs().max()) < 1e-5
