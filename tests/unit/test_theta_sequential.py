"""Sequential residual θ (the experiment benchmarks/sequential_theta.py): the rank-r fit of the reference's outputs from the
coarse model's own inputs. Where the inputs agree it is QERA's θ; where they differ it still
minimises the output error, which QERA's θ (fitted as if the inputs agreed) does not."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from nkat_runtime.theta.calibrate import whitening
from nkat_runtime.theta.svd import residual_factors, residual_matrix, truncated_svd

sys.path.append(str(Path(__file__).resolve().parents[2] / "benchmarks"))  # after site-packages: a script must never shadow a package
from sequential_theta import delta_factors, fit_delta, top_svd  # noqa: E402


def _problem(seed: int = 0, n: int = 4096, d_in: int = 64, d_out: int = 48):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g) / d_in**0.5
    x_ref = torch.randn(n, d_in, generator=g) @ mix
    x_ref[:, :3] *= 20.0
    x_c = x_ref + 0.3 * torch.randn(n, d_in, generator=g) @ mix  # the coarse model's drifted inputs
    w_ref = torch.randn(d_out, d_in, generator=g)
    w_c = w_ref + 0.1 * torch.randn(d_out, d_in, generator=g)
    return g, x_ref.double(), x_c.double(), w_ref.double(), w_c.double()


def _fit(x_ref, x_c, w_ref, w_c, rank: int, damp: float = 1e-8):
    r = x_c.T @ x_c / x_c.shape[0]
    c = x_ref.T @ x_c / x_c.shape[0]
    chol = whitening(r, damp).chol
    svd = fit_delta(w_ref @ c - w_c @ r, chol, rank)
    left, right = delta_factors(svd, chol, rank)
    return 0.5 * left.double() @ right.double()  # Δ: the file's θ is 2Δ, applied at 0.5·γ


def _error(x_ref, x_c, w_ref, w_c, delta) -> float:
    return float(((x_ref @ w_ref.T - x_c @ (w_c + delta).T) ** 2).mean())


def test_equal_inputs_give_qera():
    _, x, _, w_ref, w_c = _problem()
    rank = 4
    delta = _fit(x, x, w_ref, w_c, rank)
    wh = whitening((x.T @ x / x.shape[0]).float(), damp=1e-8)
    left, right = residual_factors(truncated_svd(residual_matrix(w_c.float(), w_ref.float(), wh), rank), rank, wh)
    qera = 0.5 * left.double() @ right.double()
    # the same optimum: equal output errors (the weights may differ where inputs hardly reach:
    # there the error is flat, and the two float32 SVDs settle apart)
    assert abs(_error(x, x, w_ref, w_c, delta) / _error(x, x, w_ref, w_c, qera) - 1) < 1e-4


def test_drifted_inputs_fit_the_reference_outputs():
    g, x_ref, x_c, w_ref, w_c = _problem()
    rank = 4
    delta = _fit(x_ref, x_c, w_ref, w_c, rank)
    best = _error(x_ref, x_c, w_ref, w_c, delta)
    # QERA's θ, fitted as if the coarse layer saw the reference's inputs, leaves more error
    wh = whitening((x_c.T @ x_c / x_c.shape[0]).float(), damp=1e-8)
    left, right = residual_factors(truncated_svd(residual_matrix(w_c.float(), w_ref.float(), wh), rank), rank, wh)
    qera = _error(x_ref, x_c, w_ref, w_c, 0.5 * left.double() @ right.double())
    none = _error(x_ref, x_c, w_ref, w_c, torch.zeros_like(w_c))
    assert best < qera < none
    # and no nearby rank-r correction does better
    u, s, vh = torch.linalg.svd(delta)
    a, b = u[:, :rank] * s[:rank], vh[:rank]
    for _ in range(100):
        da = a + 0.01 * torch.randn(a.shape, generator=g, dtype=a.dtype)
        db = b + 0.01 * torch.randn(b.shape, generator=g, dtype=b.dtype)
        assert _error(x_ref, x_c, w_ref, w_c, da @ db) >= best * (1 - 1e-6)


def test_top_svd_matches_the_full_svd():
    g = torch.Generator().manual_seed(3)
    for shape in ((40, 90), (90, 40)):
        m = torch.randn(*shape, generator=g, dtype=torch.float64)
        top = top_svd(m, 5)
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        assert torch.allclose(top.s.double(), s[:5], rtol=1e-5)
        assert torch.allclose((top.u * top.s) @ top.vh, ((u[:, :5] * s[:5]) @ vh[:5]).float(), atol=1e-4)
        assert abs(top.total_energy - float((m**2).sum())) < 1e-6 * top.total_energy


def test_damping_keeps_a_rank_deficient_fit_finite():
    g, x_ref, x_c, w_ref, w_c = _problem(n=16)  # 16 samples of 64 channels
    delta = _fit(x_ref, x_c, w_ref, w_c, 4, damp=0.01)
    assert torch.isfinite(delta).all()
