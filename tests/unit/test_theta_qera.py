"""Activation-optimal residual θ (QERA): the whitened SVD minimises the output error over the
calibration inputs, the statistics are shared by weights that read one input, and ranks under a
byte budget go where they remove the most."""

from __future__ import annotations

import torch

from nkat_runtime.theta.calibrate import input_key, whitening
from nkat_runtime.theta.ranks import allocate, rank_bytes
from nkat_runtime.theta.svd import residual_factors, residual_matrix, truncated_svd


def _inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Correlated inputs with a few loud channels, as a transformer's activations have."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    x = torch.randn(n, d, generator=g) @ mix
    x[:, :3] *= 20.0
    return x


def test_whitened_svd_minimises_the_output_error():
    g = torch.Generator().manual_seed(1)
    d_out, d_in, rank = 48, 64, 4
    w_ref = torch.randn(d_out, d_in, generator=g)
    w_q = w_ref + 0.1 * torch.randn(d_out, d_in, generator=g)
    x = _inputs(4096, d_in)
    r = x.T @ x / x.shape[0]

    def output_error(scale) -> float:
        left, right = residual_factors(truncated_svd(residual_matrix(w_q, w_ref, scale), rank), rank, scale)
        corrected = w_q + 0.5 * left @ right  # θ = 2ΔW_r at γ = 1
        return float(((x @ (w_ref - corrected).T) ** 2).mean())

    plain = output_error(None)
    diag = output_error((x.abs().mean(0)))
    qera = output_error(whitening(r, damp=1e-6))
    assert qera < diag < plain
    # the closed form's own claim: no rank-r correction does better (checked against 200 perturbations)
    left, right = residual_factors(truncated_svd(residual_matrix(w_q, w_ref, whitening(r, 1e-6)), rank), rank,
                                   whitening(r, 1e-6))
    for _ in range(200):
        dl = left + 0.01 * torch.randn(left.shape, generator=g)
        dr = right + 0.01 * torch.randn(right.shape, generator=g)
        worse = float(((x @ (w_ref - w_q - 0.5 * dl @ dr).T) ** 2).mean())
        assert worse >= qera * (1 - 1e-4)


def test_whitening_is_safe_on_a_rank_deficient_matrix():
    x = _inputs(16, 32)  # 16 samples of 32 channels: R has rank 16
    w = whitening(x.T @ x / 16)
    assert torch.isfinite(w.chol).all()
    m = torch.randn(8, 32, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(w.unwhiten(w.whiten(m)), m, atol=1e-3)


def test_any_square_root_gives_the_same_theta():
    """The Cholesky factor L (R = L·Lᵀ) in place of QERA's symmetric R^{1/2}: the same singular
    values, the same θ (L = R^{1/2}·Q for an orthogonal Q)."""
    g = torch.Generator().manual_seed(3)
    w_ref = torch.randn(24, 40, generator=g)
    w_q = w_ref + 0.1 * torch.randn(24, 40, generator=g)
    x = _inputs(2048, 40, seed=4)
    wh = whitening(x.T @ x / x.shape[0], damp=1e-4)
    r = (wh.chol @ wh.chol.T).double()  # R + λI exactly as whitened
    evals, evecs = torch.linalg.eigh(r)
    sqrt, inv = (evecs * evals.sqrt()) @ evecs.T, (evecs * evals.rsqrt()) @ evecs.T
    e = 2.0 * (w_ref - w_q).double()
    u, s, vh = torch.linalg.svd(e @ sqrt, full_matrices=False)
    rank = 5
    symmetric = (u[:, :rank] * s[:rank]) @ vh[:rank] @ inv
    svd = truncated_svd(residual_matrix(w_q, w_ref, wh), rank)
    assert torch.allclose(svd.s.double(), s[:rank], rtol=1e-4)
    cholesky = torch.matmul(*residual_factors(svd, rank, wh)).double()
    assert torch.allclose(cholesky, symmetric, atol=1e-4 * float(symmetric.abs().max()))


def test_shared_inputs():
    assert input_key("blk.3.attn_q.weight") == input_key("blk.3.attn_v.weight") == "blk.3.attn_in"
    assert input_key("blk.3.ffn_gate.weight") == input_key("blk.3.ffn_up.weight") == "blk.3.ffn_in"
    assert input_key("blk.3.ffn_down.weight") != input_key("blk.4.ffn_down.weight")
    assert input_key("blk.3.attn_output.weight") == "blk.3.attn_output"


def test_ranks_go_where_they_remove_the_most():
    def svd(values):
        s = torch.tensor(values)
        return truncated_svd(torch.diag(s), len(values))

    svds = {"loud": ((8, 8), svd([9.0, 8.0, 7.0, 0.1])), "quiet": ((8, 8), svd([1.0, 0.5, 0.2, 0.1])),
            "big": ((64, 64), svd([9.0, 0.1, 0.1, 0.1]))}
    budget = rank_bytes((8, 8), 3) + rank_bytes((8, 8), 1)
    ranks = allocate(svds, budget, max_rank=4)
    # by the share of each target's own residual a rank removes, per byte: "quiet" needs two ranks for
    # 96 % of its residual, "loud" three for 100 %; "big"'s first rank costs 7x a small one's
    assert ranks == {"loud": 2, "quiet": 2, "big": 0}
    assert sum(rank_bytes(svds[n][0], r) for n, r in ranks.items()) <= budget
    assert allocate(svds, 0, 4) == {"loud": 0, "quiet": 0, "big": 0}
