"""GPTQ against RTN, against a brute-force OBQ reference, and its edge cases (all on CPU, < 60 s)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modelpress.calib.stats import ActStatsAccumulator, HessianAccumulator
from modelpress.core.errors import ModelpressError
from modelpress.quant.algos.gptq import GPTQResult, gptq_quantize
from modelpress.quant.formats.base import WeightFormat
from modelpress.quant.formats.integer import IntFormat
from modelpress.quant.granularity import PerChannel, PerGroup, PerTensor


def make_fmt(bits: int = 4, symmetric: bool = True, granularity=PerChannel(), **kw) -> IntFormat:
    return IntFormat(bits=bits, symmetric=symmetric, granularity=granularity, **kw)


# ---- helpers ----------------------------------------------------------------------------------
def correlated_inputs(n: int, d: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """(n, d) inputs with correlated columns and a few large-scale channels, like LLM activations."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, d, generator=g, dtype=torch.float64)
    A = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5 + torch.eye(d, dtype=torch.float64)
    X = Z @ A  # (n, d)
    X[:, torch.randperm(d, generator=g)[:4]] *= 8.0
    return X.to(dtype)


def hessian(X: torch.Tensor) -> torch.Tensor:
    return 2 * X.T @ X / X.shape[0]  # (in, in)


def output_error(W: torch.Tensor, Q: torch.Tensor, X: torch.Tensor) -> float:
    return float(((W.double() - Q.double()) @ X.double().T).pow(2).sum())


def rtn(W: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    return fmt.quantize(W).dequantize()


def obq_reference(W, H, fmt, percdamp=0.01, order=None):
    """Slow, independent OBQ: one column at a time, explicit ``inv(H_F)`` for the remaining set F.

    Per-channel / static parameters are fitted once on the original W; without ``order`` a
    ``PerGroup`` format is fitted on the current (updated) weights when a group's first column comes.
    """
    W, H = W.double().clone(), H.double().clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype)
    G = fmt.granularity.size if isinstance(fmt.granularity, PerGroup) else cols
    dynamic = isinstance(fmt.granularity, PerGroup) and order is None
    static = None if dynamic else fmt.roundtrip_params(fmt.fit(fmt.grouped(W)))
    remaining = list(range(cols)) if order is None else [int(j) for j in order]
    codes = torch.zeros(rows, cols, dtype=torch.uint8)
    Q = torch.zeros(rows, cols)
    current = None
    while remaining:
        col = remaining[0]
        if dynamic and col % G == 0:
            Wg = F.pad(W[:, col : col + G], (0, G - W[:, col : col + G].shape[1]))
            current = fmt.roundtrip_params(fmt.fit(Wg.unsqueeze(1)))
        p = current if dynamic else {k: v[:, col // G : col // G + 1] if v.shape[1] > 1 else v
                                     for k, v in static.items()}
        c = fmt.encode(W[:, col].reshape(-1, 1, 1), p)
        q = fmt.decode(c, p).reshape(-1)
        codes[:, col], Q[:, col] = c.reshape(-1), q
        Hinv_F = torch.linalg.inv(H[remaining][:, remaining])  # (|F|, |F|), col first
        err = (W[:, col] - q.double()) / Hinv_F[0, 0]  # (rows,)
        W[:, remaining] -= err.unsqueeze(1) * Hinv_F[:, 0].unsqueeze(0)
        remaining.pop(0)
    return codes, Q


def check_consistent(res: GPTQResult, fmt: WeightFormat) -> None:
    """The stored QTensor is exactly the returned Q; codes lie in the format's range."""
    assert torch.equal(res.qtensor.dequantize(), res.Q)
    assert res.qtensor.codes.dtype == torch.uint8
    assert int(res.qtensor.codes.max()) < 2**fmt.bits


# ---- GPTQ beats RTN ---------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("granularity", [PerChannel(), PerGroup(size=16), PerGroup(size=32)], ids=["chan", "g16", "g32"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_gptq_beats_rtn(bits, granularity, symmetric):
    X = correlated_inputs(1024, 128)
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    fmt = make_fmt(bits, symmetric, granularity)
    res = gptq_quantize(W, hessian(X), fmt, blocksize=32)
    check_consistent(res, fmt)
    ratio = output_error(W, res.Q, X) / output_error(W, rtn(W, fmt), X)
    assert ratio < 0.75, f"GPTQ/RTN output error ratio {ratio:.3f}"


# ---- exactness against the brute-force reference -----------------------------------------------
@pytest.mark.parametrize("blocksize", [1, 4, 5, 12, 128])
@pytest.mark.parametrize("granularity", [PerChannel(), PerTensor(), PerGroup(size=4), PerGroup(size=5)],
                         ids=["chan", "tensor", "g4", "g5"])
def test_matches_brute_force_obq(blocksize, granularity):
    X = correlated_inputs(64, 12, seed=2, dtype=torch.float64)
    W = torch.randn(6, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    fmt = make_fmt(3, False, granularity)
    res = gptq_quantize(W, hessian(X), fmt, blocksize=blocksize)
    codes, Q = obq_reference(W, hessian(X), fmt)
    assert torch.equal(res.qtensor.codes, codes)
    torch.testing.assert_close(res.Q, Q, rtol=0, atol=1e-6)
    check_consistent(res, fmt)


@pytest.mark.parametrize("granularity", [PerChannel(), PerGroup(size=4), PerGroup(size=5)], ids=["chan", "g4", "g5"])
def test_act_order_matches_brute_force_obq(granularity):
    X = correlated_inputs(64, 12, seed=4, dtype=torch.float64)
    W = torch.randn(6, 12, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    H = hessian(X)
    fmt = make_fmt(3, True, granularity)
    res = gptq_quantize(W, H, fmt, blocksize=5, act_order=True)
    codes, _ = obq_reference(W, H, fmt, order=torch.argsort(torch.diag(H), descending=True))
    assert torch.equal(res.qtensor.codes, codes)
    check_consistent(res, fmt)


def test_loss_is_the_damped_quadratic_form():
    """OBS is exact on a quadratic: the summed per-column losses equal tr(dW H dW^T) / 2."""
    X = correlated_inputs(256, 32, seed=6, dtype=torch.float64)
    W = torch.randn(16, 32, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    H = hessian(X)
    res = gptq_quantize(W, H, make_fmt(4, True, PerGroup(size=8)), blocksize=8, percdamp=0.05)
    Hd = H + 0.05 * torch.mean(torch.diag(H)) * torch.eye(32, dtype=H.dtype)
    dW = W - res.Q.double()
    assert res.loss == pytest.approx(float(0.5 * (dW @ Hd * dW).sum()), rel=1e-9)


@pytest.mark.parametrize("granularity", [PerChannel(), PerTensor(), PerGroup(size=16)], ids=["chan", "tensor", "g16"])
def test_diagonal_hessian_is_rtn(granularity):
    """With no correlation between inputs there is nothing to compensate: GPTQ == RTN."""
    W = torch.randn(8, 40, generator=torch.Generator().manual_seed(8))
    fmt = make_fmt(4, False, granularity)
    res = gptq_quantize(W, torch.diag(torch.rand(40) + 0.5), fmt, blocksize=16)
    assert torch.equal(res.qtensor.codes, fmt.quantize(W).codes)
    assert torch.equal(res.Q, rtn(W, fmt))


# ---- act_order ----------------------------------------------------------------------------------
@pytest.mark.parametrize("granularity", [PerChannel(), PerGroup(size=16)], ids=["chan", "g16"])
def test_act_order(granularity):
    X = correlated_inputs(1024, 96, seed=9)
    W = torch.randn(32, 96, generator=torch.Generator().manual_seed(10))
    fmt = make_fmt(4, True, granularity)
    plain = gptq_quantize(W, hessian(X), fmt, blocksize=32)
    ordered = gptq_quantize(W, hessian(X), fmt, blocksize=32, act_order=True)
    check_consistent(ordered, fmt)
    assert not torch.equal(plain.Q, ordered.Q)  # the processing order changed
    if isinstance(granularity, PerGroup):  # static groups: every group's params come from the original W
        assert all(torch.equal(ordered.qtensor.params[k], fmt.quantize(W).params[k]) for k in ordered.qtensor.params)
    assert output_error(W, ordered.Q, X) <= output_error(W, rtn(W, fmt), X)


def test_mse_clip_format():
    """A format that searches its own clipping (``mse_clip``) works unchanged inside GPTQ."""
    X = correlated_inputs(512, 64, seed=21)
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(22))
    fmt = make_fmt(3, False, PerGroup(size=16), mse_clip=True)
    res = gptq_quantize(W, hessian(X), fmt, blocksize=24)
    check_consistent(res, fmt)
    assert output_error(W, res.Q, X) < 0.75 * output_error(W, rtn(W, fmt), X)


def test_act_order_dynamic_groups_refused():
    with pytest.raises(ModelpressError, match="static_groups"):
        gptq_quantize(torch.randn(4, 32), torch.eye(32), make_fmt(4, True, PerGroup(size=16)),
                      act_order=True, static_groups=False)


# ---- edge cases -----------------------------------------------------------------------------
def test_short_last_group_and_blocksize_invariance():
    """in=24 with groups of 16; groups straddle blocks, and the result must not depend on blocksize."""
    X = correlated_inputs(256, 24, seed=11)
    W = torch.randn(10, 24, generator=torch.Generator().manual_seed(12))
    fmt = make_fmt(4, False, PerGroup(size=16))
    results = [gptq_quantize(W, hessian(X), fmt, blocksize=b) for b in (5, 7, 16, 128)]
    for res in results:
        check_consistent(res, fmt)
        assert res.qtensor.params["scale"].shape == (10, 2)
        assert torch.equal(res.qtensor.codes, results[-1].qtensor.codes)
    assert output_error(W, results[0].Q, X) < output_error(W, rtn(W, fmt), X)


def test_non_positive_definite_hessian_retries():
    g = torch.Generator().manual_seed(13)
    V, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    eig = torch.linspace(0.5, 1.5, 16, dtype=torch.float64)
    eig[0] = -0.05  # mean(diag) = mean(eig) ~ 1, so percdamp 0.01 is too little and 0.1 enough
    H = V @ torch.diag(eig) @ V.T
    W = torch.randn(4, 16, generator=g, dtype=torch.float64)
    res = gptq_quantize(W, H, make_fmt(), percdamp=0.01)
    assert res.damp_used == pytest.approx(0.1)
    assert any("not positive definite" in w and "0.1" in w for w in res.warnings)
    check_consistent(res, make_fmt())


def test_rank_deficient_hessian_without_damping_retries():
    X = torch.randn(4, 16, generator=torch.Generator().manual_seed(14), dtype=torch.float64)  # rank 4 < 16
    res = gptq_quantize(torch.randn(4, 16, dtype=torch.float64), hessian(X), make_fmt(), percdamp=0.0)
    assert res.damp_used > 0 and res.warnings


def test_hopeless_hessian_raises():
    with pytest.raises(ModelpressError, match="not positive definite"):
        gptq_quantize(torch.randn(4, 16), -torch.eye(16), make_fmt())


def test_dead_column_becomes_zero():
    X = correlated_inputs(128, 16, seed=15)
    X[:, 3] = 0
    W = torch.randn(8, 16, generator=torch.Generator().manual_seed(16))
    res = gptq_quantize(W, hessian(X), make_fmt(4, False, PerGroup(size=8)), blocksize=4)
    assert res.dead_columns == 1
    assert torch.all(res.Q[:, 3] == 0)
    check_consistent(res, make_fmt(4, False, PerGroup(size=8)))


def test_bad_inputs_raise():
    with pytest.raises(ModelpressError, match="Hessian shape"):
        gptq_quantize(torch.randn(4, 16), torch.eye(8), make_fmt())
    with pytest.raises(ModelpressError, match="NaN"):
        gptq_quantize(torch.randn(4, 16), torch.full((16, 16), float("nan")), make_fmt())


# ---- statistics accumulators ----------------------------------------------------------------
def test_hessian_accumulator_matches_direct_formula():
    X = correlated_inputs(120, 24, seed=17)
    acc = HessianAccumulator(24)
    acc.update(X[:40].reshape(2, 20, 24))  # (batch, seq, in)
    acc.update(X[40:41])
    acc.update(X[41:41])  # empty batch is a no-op
    acc.update(X[41:].reshape(79, 1, 1, 24))
    assert acc.nsamples == 120
    torch.testing.assert_close(acc.H, hessian(X), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        acc.update(torch.randn(3, 5))


def test_act_stats_accumulator():
    X = correlated_inputs(100, 12, seed=18)
    acc = ActStatsAccumulator(12)
    acc.update(X[:30].reshape(3, 10, 12))
    acc.update(X[30:])
    assert acc.ntokens == 100
    torch.testing.assert_close(acc.mean_abs, X.abs().mean(0))
    torch.testing.assert_close(acc.max_abs, X.abs().amax(0))
    torch.testing.assert_close(acc.l2_norm, X.norm(dim=0))


def test_end_to_end_with_accumulated_hessian():
    X = correlated_inputs(512, 64, seed=19)
    acc = HessianAccumulator(64)
    for chunk in X.split(100):
        acc.update(chunk)
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(20))
    fmt = make_fmt(4, True, PerGroup(size=32))
    res = gptq_quantize(W, acc.H, fmt)
    assert output_error(W, res.Q, X) < 0.75 * output_error(W, rtn(W, fmt), X)


def test_stacking_rows_gives_each_layers_own_result():
    """q/k/v share a Hessian; quantising them stacked must equal quantising each alone (rows are independent)."""
    from modelpress.quant.formats import IntFormat
    from modelpress.quant.granularity import PerGroup

    torch.manual_seed(11)
    X = torch.randn(512, 48, dtype=torch.float64) @ torch.randn(48, 48, dtype=torch.float64)
    H = 2 * X.T @ X / X.shape[0]
    Wa, Wb = torch.randn(10, 48, dtype=torch.float64), torch.randn(6, 48, dtype=torch.float64)
    fmt = IntFormat(bits=3, granularity=PerGroup(16))
    for act_order in (False, True):
        both = gptq_quantize(torch.cat([Wa, Wb]), H.clone(), fmt, blocksize=16, act_order=act_order)
        a = gptq_quantize(Wa, H.clone(), fmt, blocksize=16, act_order=act_order)
        b = gptq_quantize(Wb, H.clone(), fmt, blocksize=16, act_order=act_order)
        assert torch.equal(both.qtensor.codes, torch.cat([a.qtensor.codes, b.qtensor.codes]))
        assert torch.allclose(both.Q, torch.cat([a.Q, b.Q]), atol=1e-9)


def test_output_error_from_the_obs_loss_equals_the_direct_trace():
    """tr(E H E^T) = 2 loss - damp ||E||^2: the stage reports output error without keeping H."""
    torch.manual_seed(3)
    X = torch.randn(300, 64) @ torch.randn(64, 64)
    H = 2 * X.T @ X / 300
    H[:, 5] = H[5, :] = 0  # one dead column
    W = torch.randn(40, 64, dtype=torch.float64)
    fmt = IntFormat(bits=3, granularity=PerGroup(size=16))
    res = gptq_quantize(W, H.double(), fmt, percdamp=0.05, act_order=True)
    live = torch.diag(H) != 0
    E = (W - res.Q.double())[:, live]
    direct = torch.einsum("oi,ij,oj->", E, H.double()[live][:, live], E)
    assert torch.allclose(torch.tensor(2 * res.loss - res.damp_abs * float(E.pow(2).sum()), dtype=torch.float64),
                          direct, rtol=1e-9)
    assert torch.allclose(res.row_loss.sum(), torch.tensor(res.loss, dtype=torch.float64))


def test_owned_hessian_is_factorised_in_place_with_the_same_result():
    torch.manual_seed(4)
    X = torch.randn(200, 48)
    H = 2 * X.T @ X / 200
    W = torch.randn(24, 48)
    fmt = IntFormat(bits=4, granularity=PerGroup(size=16))
    ref = gptq_quantize(W, H, fmt)
    mine = H.clone()
    ptr = mine.data_ptr()
    res = gptq_quantize(W, mine, fmt, own_H=True)
    assert torch.equal(res.qtensor.codes, ref.qtensor.codes)
    assert mine.data_ptr() == ptr and not torch.equal(mine, H)  # its buffer was reused, not copied
