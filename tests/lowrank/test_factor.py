"""The factorisation maths and the rank rules, against independent references (numpy SVDs of the
output matrix, brute-force sums, hand-built spectra)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from modelpress.core.errors import ModelpressError
from modelpress.lowrank.factor import (asvd_scale, fisher_scale, scaled_factor, svd_factor, whitened_factor,
                                       whitening)
from modelpress.lowrank.layer import LowRankLinear
from modelpress.lowrank.ranks import energy_rank, global_ranks, ratio_rank


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """(n, d) tokens with correlated channels and a few channels 30x larger (as LLM activations)."""
    g = gen(seed)
    mix = torch.randn(d, d, generator=g) / d ** 0.5 + torch.eye(d)
    X = torch.randn(n, d, generator=g) @ mix
    X[:, :3] *= 30.0
    return X.double()


def out_loss(W: torch.Tensor, W2: torch.Tensor, X: torch.Tensor) -> float:
    """||(W - W2) X^T||_F^2, computed directly."""
    return float(((W.double() - W2.double()) @ X.double().T).pow(2).sum())


# ---- full rank reproduces the layer ---------------------------------------------------------------
@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
def test_full_rank_layer_reproduces_linear(shape):
    out_f, in_f = shape
    torch.manual_seed(0)
    lin = torch.nn.Linear(in_f, out_f)
    W = lin.weight.detach()
    X = correlated_inputs(64, in_f).float()
    for f in (svd_factor(W, min(shape)), whitened_factor(W, X.double().T @ X.double(), min(shape)),
              scaled_factor(W, asvd_scale(X.abs().mean(0), 0.5), min(shape))):
        lr = LowRankLinear.from_factors(f.B, f.A, lin.bias.detach())
        torch.testing.assert_close(lr(X), lin(X), atol=2e-4, rtol=1e-5)


# ---- SVD-LLM: the truncation loss is the tail of the whitened spectrum ----------------------------
@pytest.mark.parametrize("rank", [1, 4, 9])
def test_svdllm_truncation_loss_is_tail_of_whitened_spectrum(rank):
    g = gen(1)
    W = torch.randn(10, 16, generator=g, dtype=torch.float64)
    X = correlated_inputs(300, 16, seed=2)
    f = whitened_factor(W, X.T @ X, rank)
    brute = out_loss(W, f.B @ f.A, X)
    # independent reference: with X = Q R (QR), ||E X^T|| = ||E R^T||, so the best rank-r output fit
    # loses exactly the tail of the singular values of W X^T (numpy, no Cholesky involved)
    sv = np.linalg.svd(W.numpy() @ X.numpy().T, compute_uv=False)
    tail = float((sv[rank:] ** 2).sum())
    assert brute == pytest.approx(f.truncation_loss(), rel=1e-7)
    assert brute == pytest.approx(tail, rel=1e-7)
    # Eckart-Young in the whitened space: no rank-r weight does better (plain SVD certainly not)
    p = svd_factor(W, rank)
    assert out_loss(W, p.B @ p.A, X) > brute


def test_activation_aware_beats_plain_svd_on_skewed_correlated_inputs():
    g = gen(3)
    W = torch.randn(24, 32, generator=g, dtype=torch.float64)
    X = correlated_inputs(400, 32, seed=4)
    for rank in (4, 8, 16):
        plain = svd_factor(W, rank)
        asvd = scaled_factor(W, asvd_scale(X.abs().mean(0), 0.5), rank)
        llm = whitened_factor(W, X.T @ X, rank)
        e_plain, e_asvd, e_llm = (out_loss(W, f.B @ f.A, X) for f in (plain, asvd, llm))
        assert e_llm < e_asvd < e_plain, (rank, e_llm, e_asvd, e_plain)


def test_asvd_scale_is_undone():
    """W ≈ B A in the original basis: at full rank ASVD gives W back whatever the scale."""
    W = torch.randn(6, 9, generator=gen(5), dtype=torch.float64)
    s = torch.rand(9, generator=gen(6), dtype=torch.float64) * 100 + 0.01
    f = scaled_factor(W, s, 6)
    torch.testing.assert_close(f.B @ f.A, W)
    # truncated: the error is the tail of the spectrum of W diag(s), measured in the scaled basis
    f3 = scaled_factor(W, s, 3)
    sv = np.linalg.svd((W * s).numpy(), compute_uv=False)
    assert float(((W - f3.B @ f3.A) * s).pow(2).sum()) == pytest.approx(float((sv[3:] ** 2).sum()), rel=1e-9)


def test_dead_channel_scale_is_floored():
    s = asvd_scale(torch.tensor([0.0, 4.0, 1.0]), 0.5)
    assert s.tolist() == [1.0, 2.0, 1.0]


# ---- FWSVD: rows weighted by their Fisher information ---------------------------------------------
def fisher_loss(W: torch.Tensor, W2: torch.Tensor, I: torch.Tensor) -> float:
    """sum_i I_i ||W_i - W2_i||^2, computed directly."""
    return float((I.double()[:, None] * (W.double() - W2.double()).pow(2)).sum())


def unequal_rows(out_f: int = 24, in_f: int = 32, seed: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and a row Fisher spanning six decades (a few rows dominate the loss)."""
    g = gen(seed)
    W = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    I = 10.0 ** (6 * torch.rand(out_f, generator=g, dtype=torch.float64) - 3)
    return W, I


@pytest.mark.parametrize("rank", [1, 4, 9])
def test_fwsvd_weighted_error_is_tail_of_row_scaled_spectrum(rank):
    W, I = unequal_rows()
    f = scaled_factor(W, None, rank, row=fisher_scale(I))
    brute = fisher_loss(W, f.B @ f.A, I)
    sv = np.linalg.svd((I.sqrt()[:, None] * W).numpy(), compute_uv=False)  # independent reference
    assert brute == pytest.approx(float((sv[rank:] ** 2).sum()), rel=1e-9)
    assert brute == pytest.approx(f.truncation_loss(), rel=1e-9)
    assert f.B.shape == (24, rank) and f.A.shape == (rank, 32)


def test_fwsvd_full_rank_gives_the_weight_back():
    W, I = unequal_rows()
    f = scaled_factor(W, None, min(W.shape), row=fisher_scale(I))
    torch.testing.assert_close(f.B @ f.A, W)


def test_fwsvd_beats_plain_svd_on_unequal_row_importance():
    W, I = unequal_rows()
    for rank in (2, 4, 8, 16):
        plain, fw = svd_factor(W, rank), scaled_factor(W, None, rank, row=fisher_scale(I))
        e_plain, e_fw = fisher_loss(W, plain.B @ plain.A, I), fisher_loss(W, fw.B @ fw.A, I)
        assert e_fw < 0.9 * e_plain, (rank, e_fw, e_plain)
        # ... and pays for it in the unweighted error (it is a trade, not a free lunch)
        assert float((W - fw.B @ fw.A).pow(2).sum()) > float((W - plain.B @ plain.A).pow(2).sum())


def test_equal_row_importance_is_plain_svd():
    W = torch.randn(10, 14, generator=gen(12), dtype=torch.float64)
    fw, plain = scaled_factor(W, None, 5, row=fisher_scale(torch.full((10,), 3.0))), svd_factor(W, 5)
    torch.testing.assert_close(fw.B @ fw.A, plain.B @ plain.A)


def test_dead_rows_are_floored_and_stay_finite():
    assert fisher_scale(torch.tensor([0.0, 4.0, 1.0])).tolist() == [1.0, 2.0, 1.0]
    assert fisher_scale(torch.zeros(3)).tolist() == [1.0, 1.0, 1.0]
    W, I = unequal_rows()
    I[:5] = 0.0  # rows the loss never reached
    f = scaled_factor(W, None, 6, row=fisher_scale(I))
    assert bool(torch.isfinite(f.B).all() and torch.isfinite(f.A).all())
    full = scaled_factor(W, None, 24, row=fisher_scale(I))
    torch.testing.assert_close(full.B @ full.A, W)


# ---- non-positive-definite Gram matrices are dampened, and say so ------------------------------
def test_rank_deficient_gram_is_dampened_with_a_note():
    X = correlated_inputs(5, 12, seed=7)  # 5 tokens, 12 features: G has rank 5
    G = X.T @ X
    with pytest.raises(RuntimeError):
        torch.linalg.cholesky(G - 1e-9 * torch.eye(12, dtype=G.dtype))  # really not PD
    S, notes = whitening(G)
    assert notes and "not positive definite" in notes[0]
    lam = float(notes[0].split("used ")[1].split(" x")[0])
    torch.testing.assert_close(S @ S.T, G + lam * float(G.diagonal().mean()) * torch.eye(12, dtype=G.dtype))
    f = whitened_factor(torch.randn(4, 12, dtype=torch.float64), G, 2)
    assert f.notes == notes


def test_positive_definite_gram_needs_no_note():
    X = correlated_inputs(100, 8, seed=8)
    assert whitening(X.T @ X)[1] == []


# ---- ranks ------------------------------------------------------------------------------------------
def test_rank_outside_range_refused():
    W = torch.randn(4, 6)
    for r in (0, 5):
        with pytest.raises(ModelpressError, match=rf"rank {r} is outside \[1, 4\]"):
            svd_factor(W, r)


def test_energy_rank_matches_brute_force():
    sigma = torch.sort(torch.rand(30, generator=gen(9)) ** 3, descending=True).values
    e = sigma.double() ** 2
    for thr in (0.1, 0.5, 0.9, 0.99, 1.0):
        brute = next(r for r in range(1, 31) if float(e[:r].sum()) >= thr * float(e.sum()) - 1e-12)
        assert energy_rank(sigma, thr) == brute


def test_ratio_rank_meets_per_layer_budget():
    for out_f, in_f in [(576, 576), (576, 1536), (1536, 576), (192, 576), (7, 3)]:
        r = ratio_rank((out_f, in_f), 0.8)
        assert (out_f + in_f) * r <= 0.8 * out_f * in_f < (out_f + in_f) * (r + 1)
    with pytest.raises(ModelpressError, match="cannot be met"):
        ratio_rank((4, 4), 0.2)  # rank 1 keeps half of a 4x4


def test_global_allocation_hits_budget_and_favours_slow_decay():
    g = gen(10)
    shapes = [(64, 64), (64, 160), (160, 64), (32, 64)]
    decays = [0.5, 0.9, 0.97, 0.7]  # geometric spectra: fast to slow decay
    spectra = {f"l{i}": (s, torch.tensor([d ** j for j in range(min(s))]) * (1 + torch.rand(1, generator=g)))
               for i, (s, d) in enumerate(zip(shapes, decays))}
    total = sum(a * b for a, b in shapes)
    for ratio in (0.3, 0.5, 0.8):
        ranks = global_ranks(spectra, ratio)
        used = sum((s[0] + s[1]) * ranks[n] for n, (s, _) in spectra.items())
        assert used <= ratio * total
        # nothing left over: one more rank on any layer below its cap would break the budget
        caps = {n: min(min(s), s[0] * s[1] // sum(s)) for n, (s, _) in spectra.items()}
        assert all(used + sum(s) > ratio * total for n, (s, _) in spectra.items() if ranks[n] < caps[n])
        # energy kept (relative, summed over layers) beats the uniform per-layer rule at the same budget
        def kept(rk):
            return sum(float(sig[: rk[n]].pow(2).sum() / sig.pow(2).sum()) for n, (_, sig) in spectra.items())
        uni = {n: ratio_rank(s, ratio) for n, (s, _) in spectra.items()}
        assert kept(ranks) >= kept(uni) - 1e-12
        assert ranks["l0"] < uni["l0"]  # the fastest decay gives rank away


def test_global_allocation_unreachable_budget_refused():
    spectra = {"a": ((8, 8), torch.ones(8)), "b": ((8, 8), torch.ones(8))}
    with pytest.raises(ModelpressError, match="cannot be met"):
        global_ranks(spectra, 0.2)  # rank 1 everywhere keeps 16/64
