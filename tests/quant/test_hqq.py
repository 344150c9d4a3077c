"""HQQ and its float-zero integer format: the solver beats min-max rounding, a hand-checked update, the
format's contract (codes, storage, idempotence), save -> reload identical, refusals at recipe load."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import modelpress as mp
from modelpress.core.errors import ModelpressError
from modelpress.export.saving import load_compressed, save_compressed
from modelpress.pipeline.recipe import load_recipe, parse_recipe
from modelpress.quant.algos.hqq.hqq import hqq_zero, shrink_lp
from modelpress.quant.algos.hqq.method import HQQConfig, hqq_quantize
from modelpress.quant.formats import QTensor, format_from_dict
from modelpress.quant.formats.int_fz import FloatZeroIntFormat
from modelpress.quant.granularity import PerChannel, PerGroup, PerTensor
from modelpress.quant.qlinear import QuantLinear
from tests.conftest import make_tiny_llama


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gaussian(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def heavy_tailed(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Student-t with 2 degrees of freedom (infinite variance): outliers in most groups.
    (A chi-squared variable with 2 degrees of freedom is -2 log U, U uniform.)"""
    g = torch.Generator().manual_seed(seed)
    z, u = torch.randn(rows, cols, generator=g), torch.rand(rows, cols, generator=g).clamp_min(1e-12)
    return z / torch.sqrt(-torch.log(u))


def sq_err(fmt: FloatZeroIntFormat, w: torch.Tensor, qt: QTensor) -> float:
    return float((qt.dequantize() - w).pow(2).sum())


# ---- the format --------------------------------------------------------------------------------
FORMATS = [FloatZeroIntFormat(bits=4, granularity=64), FloatZeroIntFormat(bits=3, granularity=PerChannel()),
           FloatZeroIntFormat(bits=2, granularity=PerTensor(), scale_dtype="bfloat16"),
           FloatZeroIntFormat(bits=8, granularity=32, zero_dtype="float32")]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: json.dumps(f.to_dict(), sort_keys=True))
def test_registered_json_round_trip_and_bit_exact_storage(fmt):
    assert format_from_dict(json.loads(json.dumps(fmt.to_dict()))) == fmt
    w = heavy_tailed(24, 200, seed=1)  # 200: a short last group for the grouped formats
    qt = fmt.quantize(w)
    assert qt.codes.dtype == torch.uint8 and int(qt.codes.max()) <= fmt.qmax
    back = QTensor.from_tensors(fmt, w.shape, {k: v.clone() for k, v in qt.to_tensors().items()})
    assert torch.equal(back.codes, qt.codes)
    assert torch.equal(back.dequantize().view(torch.int32), qt.dequantize().view(torch.int32))


def test_zero_point_is_stored_as_a_float_and_costs_its_bits():
    qt = FloatZeroIntFormat(bits=4, granularity=64).quantize(gaussian(16, 256))
    assert qt.params["zero"].dtype == torch.float16 and qt.params["scale"].dtype == torch.float16
    assert (qt.params["zero"].float() != qt.params["zero"].float().round()).any()  # fractional
    assert qt.bits_per_weight() == 4 + 32 / 64


def test_min_max_uses_the_true_range():
    """An all-positive group gets a grid over [min, max], not [0, max] as an integer zero point forces."""
    w = torch.linspace(1.0, 2.5, 64).reshape(1, 64)
    fz = FloatZeroIntFormat(bits=4, granularity=64).quantize(w)
    asym = format_from_dict({"type": "int", "bits": 4, "symmetric": False, "granularity": 64}).quantize(w)
    assert float(fz.params["scale"]) == pytest.approx(1.5 / 15, rel=2**-10)
    assert float(fz.params["zero"]) == pytest.approx(-10.0, rel=2**-10)
    assert float(asym.params["scale"]) == pytest.approx(2.5 / 15, rel=2**-10)  # 0 to 2.5: a 5/3 coarser step
    assert float((fz.dequantize() - w).abs().max()) <= 0.5 * 0.1 * (1 + 2**-9)


def test_zero_groups_decode_to_zero_and_constant_groups_stay_near():
    w = gaussian(4, 128)
    w[1] = 0.0
    w[2] = 0.75
    out = FloatZeroIntFormat(bits=4, granularity=64).fake_quantize(w)
    assert (out[1] == 0).all()
    assert (out[2] - 0.75).abs().max() <= 0.75 * 2**-10


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), gran=st.sampled_from([PerTensor(), PerChannel(), PerGroup(32)]),
       magnitude=st.sampled_from([1e-3, 1.0, 300.0]), seed=st.integers(0, 2**31 - 1))
def test_rounding_error_at_most_half_a_step_plus_the_stored_zero(bits, gran, magnitude, seed):
    fmt = FloatZeroIntFormat(bits=bits, granularity=gran)
    w = gaussian(8, 96, seed) * magnitude
    qt = fmt.quantize(w)
    p = fmt.load_params(qt.params)  # (rows, n_groups, 1)
    err = (fmt.grouped(qt.dequantize()) - fmt.grouped(w)).abs()
    zero_ulp = torch.abs(p["zero"]) * 2.0**-11 + 2.0**-24  # float16 rounding of the zero point, in steps
    assert bool((err <= (0.5 * (1 + 1e-5) + zero_ulp) * p["scale"]).all())


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 5, 8]), gran=st.sampled_from([PerTensor(), PerChannel(), PerGroup(32)]),
       scale_dtype=st.sampled_from(["float16", "bfloat16"]), seed=st.integers(0, 2**31 - 1))
def test_requantising_a_dequantised_weight_is_a_no_op(bits, gran, scale_dtype, seed):
    fmt = FloatZeroIntFormat(bits=bits, granularity=gran, scale_dtype=scale_dtype)
    once = fmt.fake_quantize(heavy_tailed(8, 200, seed))
    assert torch.equal(fmt.fake_quantize(once), once)


def test_bits_validated_and_no_exact_zero():
    for bad in (1, 9):
        with pytest.raises(ValidationError, match=r"2\.\.8 bits"):
            FloatZeroIntFormat(bits=bad)
    assert FloatZeroIntFormat(bits=4).exact_zero is False  # pruning + quantisation needs an exact 0


# ---- the solver ----------------------------------------------------------------------------------
def test_shrink_lp_is_the_generalised_soft_threshold():
    x = torch.tensor([-2.0, -0.05, 0.0, 0.05, 0.5])
    torch.testing.assert_close(shrink_lp(x, beta=10.0, p=1.0), torch.tensor([-1.9, 0.0, 0.0, 0.0, 0.4]))
    expect = torch.sign(x) * torch.relu(x.abs() - x.abs().pow(-0.3) / 10.0)
    torch.testing.assert_close(shrink_lp(x, beta=10.0, p=0.7), torch.nan_to_num(expect, nan=0.0))


def test_one_update_by_hand_then_the_least_squares_optimum():
    """2-bit grid, scale 1 (range [0, 3]), zero 0; three values sit 0.4 above a grid point.

    One iteration with p = 1, beta = 10: Wq = [0, 0, 1, 2, 3], errors [0, .4, .4, .4, 0], shrunk by
    1/beta to W_e = [0, .3, .3, .3, 0], z = mean(Wq - (W - W_e)) = mean([0, -.1, -.1, -.1, 0]) = -0.06.
    Moving the grid up by d costs 2 d^2 + 3 (0.4 - d)^2, least at d = 0.24 (0.192); HQQ gets there.
    """
    fmt = FloatZeroIntFormat(bits=2, granularity=PerChannel(), zero_dtype="float32")
    W = fmt.grouped(torch.tensor([[0.0, 0.4, 1.4, 2.4, 3.0]]))
    start = fmt.fit(W)
    assert float(start["scale"]) == 1.0 and float(start["zero"]) == 0.0
    z1 = hqq_zero(W, start, fmt, p=1.0, beta=10.0, kappa=1.01, iters=1)
    assert float(z1) == pytest.approx(-0.06, abs=1e-6)
    z = hqq_zero(W, start, fmt, p=0.7, beta=10.0, kappa=1.01, iters=50, early_stop=False)
    grid = {"scale": start["scale"], "zero": z}
    sse = float((fmt.decode(fmt.encode(W, grid), grid) - W).pow(2).sum())
    assert float(z) == pytest.approx(-0.24, abs=0.02) and sse == pytest.approx(0.192, rel=0.01)


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("weights", [gaussian, heavy_tailed])
def test_hqq_beats_rounding_on_the_same_format(bits, weights):
    """Lower squared and mean |error| than min-max rounding on the float-zero grid and than the integer
    zero point (the start, and what ``type: int`` asymmetric stores); no group ends worse than its start."""
    w = weights(64, 512, seed=bits)
    cfg = HQQConfig(format={"type": "int_fz", "bits": bits, "granularity": 64})
    rtn, hqq = cfg.format.quantize(w), hqq_quantize(w, cfg)
    start = hqq_quantize(w, cfg.model_copy(update={"iters": 0}))
    integer_zero = format_from_dict({"type": "int", "bits": bits, "symmetric": False, "granularity": 64}).quantize(w)
    for other in (rtn, start, integer_zero):  # measured: 0.48 .. 0.97 of the others' squared error
        assert sq_err(cfg.format, w, hqq) < 0.98 * sq_err(cfg.format, w, other)
        assert float((hqq.dequantize() - w).abs().mean()) < float((other.dequantize() - w).abs().mean())
    groupwise = lambda qt: (cfg.format.grouped(qt.dequantize()) - cfg.format.grouped(w)).pow(2).sum(-1)  # noqa: E731
    assert bool((groupwise(hqq) <= groupwise(start)).all())  # each group keeps its best iterate


def test_short_last_group_is_solved_on_its_real_columns():
    w = heavy_tailed(16, 96, seed=4)  # groups of 64: one whole group, then 32 real columns + 32 of padding
    cfg = HQQConfig(format={"type": "int_fz", "bits": 3, "granularity": 64})
    tail = hqq_quantize(w[:, 64:], cfg.model_copy(update={"format": FloatZeroIntFormat(bits=3)}))  # per channel
    qt = hqq_quantize(w, cfg)
    assert torch.equal(qt.params["zero"][:, 1], tail.params["zero"][:, 0])
    assert torch.equal(qt.params["scale"][:, 1], tail.params["scale"][:, 0])


def test_hqq_of_an_hqq_weight_is_a_no_op_and_zero_iterations_is_the_rounded_start():
    cfg = HQQConfig(format={"type": "int_fz", "bits": 4, "granularity": 32})
    once = hqq_quantize(heavy_tailed(8, 128, seed=5), cfg).dequantize()
    assert torch.equal(hqq_quantize(once, cfg).dequantize(), once)
    w = heavy_tailed(8, 128, seed=6)
    start = hqq_quantize(w, cfg.model_copy(update={"iters": 0}))  # min-max scale, zero rounded to an integer
    rtn = cfg.format.quantize(w)
    assert torch.equal(start.params["scale"], rtn.params["scale"])
    assert torch.equal(start.params["zero"], rtn.params["zero"].float().round().half())


# ---- the method in a model -------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", ["hqq-w4-g64", "hqq-w3-g64"])
def test_builtin_recipe_save_reload_identical(recipe, tmp_path):
    st = load_recipe(recipe).stages[0]
    assert st.method == "hqq" and st.format == FloatZeroIntFormat(bits=int(recipe[5]), granularity=64)
    lm = mp.load(make_tiny_llama(seed=7))
    rep = mp.compress(lm, recipe, progress=False)
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(0))
    before = lm.module(input_ids=ids).logits
    back = load_compressed(save_compressed(lm, tmp_path / "m", recipe=mp.as_recipe(recipe), report=rep))
    for row in rep["layers"]:
        m, m2 = lm.module.get_submodule(row["name"]), back.module.get_submodule(row["name"])
        assert isinstance(m2, QuantLinear) and m2.fmt == m.fmt
        assert all(torch.equal(getattr(m, k), getattr(m2, k)) for k in m._tensor_names)
    assert torch.equal(before, back.module(input_ids=ids).logits)
    assert rep["mean_bits_per_weight"] == 4.5 if recipe == "hqq-w4-g64" else 3.5


def test_reference_kernel_runs_it_and_int_kernels_decline(tmp_path):
    from modelpress.kernels.install import install_kernels

    lm = mp.load(make_tiny_llama(seed=8, hidden=128, inter=256))
    mp.compress(lm, "hqq-w4-g64", progress=False)
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(1))
    before = lm.module(input_ids=ids).logits
    plan = install_kernels(lm.module, dtype=torch.float32)
    assert {k for _, k, _ in plan.rows} == {"reference"}
    assert torch.equal(lm.module(input_ids=ids).logits, before)


def test_formats_without_a_float_zero_are_refused_at_load_naming_both():
    for fmt in ({"type": "int", "bits": 4, "symmetric": False, "granularity": 64}, {"type": "nf4"}):
        with pytest.raises(ModelpressError) as ei:
            parse_recipe({"name": "x", "stages": [{"method": "hqq", "format": fmt}]})
        msg = str(ei.value)
        assert "stages[0].format" in msg and "hqq" in msg and f"got type {fmt['type']!r}" in msg and "\n" not in msg


@pytest.mark.parametrize("field,value", [("lp_norm", 0), ("lp_norm", 1.5), ("beta", 0), ("kappa", 0.5),
                                         ("iters", -1), ("iters", 10**6)])
def test_bad_solver_settings_are_refused_naming_the_field(field, value):
    with pytest.raises(ModelpressError, match=rf"stages\[0\]\.{field}"):
        parse_recipe({"name": "x", "stages": [{"method": "hqq", field: value}]})
