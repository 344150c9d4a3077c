"""SparseGPT and Wanda maths against independent references on a hand-built correlated Hessian."""
from __future__ import annotations

import pytest
import torch

from modelpress.core.errors import ModelpressError
from modelpress.quant.formats import IntFormat
from modelpress.quant.granularity import PerGroup
from modelpress.sparsity.algos.sparsegpt.sparsegpt import sparsegpt_prune
from modelpress.sparsity.algos.wanda.wanda import wanda_mask, wanda_scores
from modelpress.sparsity.masks import mask_from_scores
from modelpress.sparsity.patterns import NM, Block, Unstructured


def correlated_problem(rows: int = 48, cols: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """W (rows, cols) and H = 2 X^T X / n for inputs with correlated features of unequal scale."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(cols, cols, generator=g, dtype=torch.float64) / cols**0.5
    scales = torch.logspace(-1, 1, cols, dtype=torch.float64)  # outlier-ish channels
    X = torch.randn(4096, cols, generator=g, dtype=torch.float64) @ (torch.eye(cols, dtype=torch.float64) + 2 * A) * scales
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    return W, 2 * X.T @ X / X.shape[0]


def out_err(W: torch.Tensor, Wp: torch.Tensor, H: torch.Tensor) -> float:
    E = W - Wp.to(W.dtype)
    return float(torch.einsum("oi,ij,oj->", E, H, E))  # tr(E H E^T)


@pytest.mark.parametrize("pattern,sparsity", [(Unstructured(), 0.5), (NM(2, 4), None), (NM(1, 4), None)])
def test_sparsegpt_beats_magnitude_and_wanda(pattern, sparsity) -> None:
    W, H = correlated_problem()
    mag = W * mask_from_scores(W.abs(), pattern, sparsity)
    wan = W * wanda_mask(W, (torch.diag(H) / 2).sqrt(), pattern, sparsity)  # ||X_j|| / sqrt(n) from H's diagonal
    res = sparsegpt_prune(W, H, pattern, sparsity, percdamp=0.01)
    e_sgpt, e_mag, e_wanda = out_err(W, res.W, H), out_err(W, mag, H), out_err(W, wan, H)
    assert e_sgpt < e_wanda < e_mag, (e_sgpt, e_wanda, e_mag)
    # the mask has the pattern and the pruned weights are exactly 0
    assert bool((res.W[~res.mask] == 0).all())
    if isinstance(pattern, NM):
        assert bool(((~res.mask).reshape(W.shape[0], -1, pattern.m).sum(-1) == pattern.m - pattern.n).all())
    else:  # adaptive selection across rows, block by block; the layer total is exact
        assert int((~res.mask).sum()) == round(sparsity * W.numel())


def test_sparsegpt_equals_brute_force_obs_for_a_pruned_prefix() -> None:
    """Pruning the first k columns: the sequential OBS updates must give the exact constrained optimum.

    Reference: for each row, minimise (w - w')^T H (w - w') subject to w'_P = 0 by solving the
    reduced linear system on the free columns F directly: w'_F = w_F + H_FF^-1 H_FP w_P.
    """
    W, H = correlated_problem(rows=6, cols=20, seed=3)
    k = 7
    mask = torch.ones_like(W, dtype=torch.bool)
    mask[:, :k] = False
    damp = 0.01 * torch.diag(H).mean()
    res = sparsegpt_prune(W, H, Unstructured(), mask=mask, percdamp=0.01, blocksize=4)  # several blocks
    Hd = H + damp * torch.eye(H.shape[0], dtype=H.dtype)
    P, F_ = slice(0, k), slice(k, None)
    ref = torch.zeros_like(W)
    ref[:, F_] = W[:, F_] + torch.linalg.solve(Hd[F_, F_], Hd[F_, P] @ W[:, P].T).T
    assert torch.allclose(res.W.double(), ref, atol=1e-5, rtol=1e-5)
    # and a single pruned column (k = 1) is the textbook OBS update w' = w - w_q / [H^-1]_qq H^-1[:, q]
    m1 = torch.ones_like(W, dtype=torch.bool)
    m1[:, 0] = False
    r1 = sparsegpt_prune(W, H, Unstructured(), mask=m1, percdamp=0.01)
    Hinv = torch.linalg.inv(Hd)
    obs = W - (W[:, :1] / Hinv[0, 0]) * Hinv[0:1, :]
    assert torch.allclose(r1.W.double(), obs, atol=1e-5, rtol=1e-5)


def test_sparsegpt_mask_is_independent_of_blocksize_for_nm() -> None:
    W, H = correlated_problem(rows=8, cols=32, seed=5)
    a = sparsegpt_prune(W, H, NM(2, 4), blocksize=8)
    b = sparsegpt_prune(W, H, NM(2, 4), blocksize=32)
    assert torch.equal(a.mask, b.mask) and torch.allclose(a.W, b.W, atol=1e-9)


def test_joint_2of4_int4_dequantises_exactly_and_beats_prune_then_rtn() -> None:
    W, H = correlated_problem(rows=32, cols=96, seed=7)
    fmt = IntFormat(bits=4, granularity=PerGroup(size=64))  # 96 = 64 + a short group of 32
    res = sparsegpt_prune(W.float(), H.float(), NM(2, 4), fmt=fmt)
    assert torch.equal(res.qtensor.dequantize(), res.W)
    assert ((res.W == 0).reshape(32, 24, 4).sum(-1) >= 2).all()
    naive = fmt.fake_quantize((W * mask_from_scores(W.abs(), NM(2, 4))).float())
    assert out_err(W, res.W, H) < out_err(W, naive, H)


def test_wanda_scores_hand_computed() -> None:
    W = torch.tensor([[1.0, -2.0, 3.0, -4.0]])
    norm = torch.tensor([4.0, 1.0, 1.0, 0.5])
    assert wanda_scores(W, norm).tolist() == [[4.0, 2.0, 3.0, 2.0]]
    assert wanda_mask(W, norm, NM(2, 4), None).tolist() == [[True, False, True, False]]  # 2 vs 2 tie: pruned by position
    assert wanda_mask(W, norm, Unstructured(), 0.25).tolist() == [[True, False, True, True]]


def test_sparsegpt_bad_input() -> None:
    W, H = correlated_problem(rows=4, cols=8)
    with pytest.raises(ModelpressError, match="sparsity in \\[0, 1\\)"):
        sparsegpt_prune(W, H, Unstructured(), 1.0)
    with pytest.raises(ModelpressError, match="not block"):
        sparsegpt_prune(W, H, Block(2, 2), 0.5)
    with pytest.raises(ModelpressError, match="does not match"):
        sparsegpt_prune(W, H[:4, :4], Unstructured(), 0.5)
