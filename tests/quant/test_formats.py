"""Weight formats: error bounds, bit-exact codecs, save/load, config round trips, idempotence."""
from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from modelpress.quant.formats import (
    FP8Format,
    IntFormat,
    MXFP4Format,
    NF4Format,
    NVFP4Format,
    QTensor,
    WeightFormat,
    format_from_dict,
)
from modelpress.quant.formats.fp4 import E2M1_VALUES, decode_e2m1, encode_e2m1
from modelpress.quant.formats.fp8 import decode_fp8, encode_fp8
from modelpress.quant.formats.nf4 import NF4_VALUES, double_dequantize, double_quantize, dynamic_map
from modelpress.quant.granularity import PerChannel, PerGroup, PerTensor


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add contention here."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def weight(rows: int, cols: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    """Gaussian weight with a few outliers, like a trained Linear."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * scale
    w[torch.randint(0, rows, (3,), generator=g), torch.randint(0, cols, (3,), generator=g)] *= 6
    return w


ALL_FORMATS: list[WeightFormat] = [
    IntFormat(bits=4, granularity=128),
    IntFormat(bits=3, symmetric=False, granularity=64, scale_dtype="bfloat16"),
    IntFormat(bits=8, granularity="channel", scale_dtype="float32"),
    IntFormat(bits=2, symmetric=False, granularity="tensor", mse_clip=True),
    IntFormat(bits=5, granularity=32),
    NF4Format(),
    NF4Format(double_quant=False, granularity=128),
    FP8Format(variant="e4m3"),
    FP8Format(variant="e5m2", granularity=64),
    FP8Format(variant="e4m3", granularity="tensor"),
    MXFP4Format(),
    NVFP4Format(),
]
IDS = [json.dumps(f.to_dict(), sort_keys=True) for f in ALL_FORMATS]


# ---- every format ------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=IDS)
def test_config_json_round_trip(fmt: WeightFormat) -> None:
    data = json.loads(json.dumps(fmt.to_dict()))
    assert format_from_dict(data) == fmt
    assert type(format_from_dict(data)) is type(fmt)


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=IDS)
def test_save_load_is_bit_identical(fmt: WeightFormat) -> None:
    w = weight(24, 200, seed=1)  # 200 is not a multiple of any group size above
    qt = fmt.quantize(w)
    assert qt.codes.shape == w.shape and qt.codes.dtype == torch.uint8
    assert int(qt.codes.max()) < 2**fmt.code_bits
    tensors = qt.to_tensors()
    back = QTensor.from_tensors(fmt, w.shape, {k: v.clone() for k, v in tensors.items()})
    assert torch.equal(back.codes, qt.codes)
    assert torch.equal(back.dequantize().view(torch.int32), qt.dequantize().view(torch.int32))


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=IDS)
def test_zero_groups_decode_to_exact_zero(fmt: WeightFormat) -> None:
    w = weight(8, 128, seed=2)
    w[3] = 0.0  # a zero row: zero scale/absmax for per-channel and group formats
    for t in (w, torch.zeros(8, 128)):
        out = fmt.fake_quantize(t)
        assert torch.isfinite(out).all()
        assert (out[3] == 0).all()
    assert (fmt.fake_quantize(torch.zeros(8, 128)) == 0).all()


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=IDS)
def test_reasonable_error(fmt: WeightFormat) -> None:
    w = weight(32, 256, seed=3)
    err = (fmt.fake_quantize(w) - w).pow(2).mean() / w.pow(2).mean()
    sqnr_db = -10 * math.log10(float(err))
    bits = fmt.code_bits
    assert sqnr_db > {2: 3, 3: 10, 4: 14, 5: 20, 8: 25}[bits], sqnr_db


# ---- integer -----------------------------------------------------------------------------------
def int_error_ratio(fmt: IntFormat, w: torch.Tensor) -> torch.Tensor:
    """|w - dequant(w)| in units of the stored scale, per element of the grouped view."""
    qt = fmt.quantize(w)
    scale = fmt.load_params(qt.params)["scale"]  # (rows, n_groups, 1)
    err = (fmt.grouped(w) - fmt.grouped(qt.dequantize())).abs()
    return torch.where(scale > 0, err / torch.where(scale > 0, scale, 1), err)


granularities = st.sampled_from([PerTensor(), PerChannel(), PerGroup(size=128), PerGroup(size=32)])


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    symmetric=st.booleans(),
    gran=granularities,
    scale_dtype=st.sampled_from(["float16", "bfloat16", "float32"]),
    magnitude=st.sampled_from([1e-3, 1.0, 300.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_int_rtn_error_at_most_half_a_stored_step(
    bits, symmetric, gran, scale_dtype, magnitude, seed
) -> None:
    fmt = IntFormat(bits=bits, symmetric=symmetric, granularity=gran, scale_dtype=scale_dtype)
    w = weight(12, 576, seed=seed, scale=magnitude)  # group 128: 5 groups, the last 64 wide
    assert float(int_error_ratio(fmt, w).max()) <= 0.5 * (1 + 1e-5)


def test_int_short_last_group_layout() -> None:
    qt = IntFormat(bits=4, granularity=128).quantize(weight(6, 576))
    assert qt.params["scale"].shape == (6, 5)
    assert qt.params["scale"].dtype == torch.float16


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4, 5, 8]),
    symmetric=st.booleans(),
    gran=granularities,
    scale_dtype=st.sampled_from(["float16", "bfloat16"]),
    mse_clip=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_int_idempotent(bits, symmetric, gran, scale_dtype, mse_clip, seed) -> None:
    fmt = IntFormat(
        bits=bits, symmetric=symmetric, granularity=gran, scale_dtype=scale_dtype, mse_clip=mse_clip
    )
    once = fmt.fake_quantize(weight(8, 200, seed=seed))
    assert torch.equal(fmt.fake_quantize(once), once)


def test_int_symmetric_scale_formula() -> None:
    """Positive extreme dominant: scale is GPTQ's amax / ((2**b - 1) / 2), rounded up to fp16."""
    w = torch.tensor([[0.9, -0.3, 0.1, 2.0], [-1.0, 0.5, 0.25, 0.0]])
    qt = IntFormat(bits=4).quantize(w)
    s = qt.params["scale"].float()
    assert 2.0 / 7.5 <= float(s[0]) < 2.0 / 7.5 * (1 + 2**-10)
    assert float(s[1]) == pytest.approx(1.0 / 8, rel=2**-10)  # negative extreme: -8 * s, no clipping


def test_int_bits_per_weight() -> None:
    w = weight(16, 1024)
    assert IntFormat(bits=4, granularity=128).quantize(w).bits_per_weight() == 4 + 16 / 128
    assert IntFormat(bits=4, granularity=128, symmetric=False).quantize(w).bits_per_weight() == 4 + 24 / 128
    assert IntFormat(bits=3, granularity=128).quantize(w).bits_per_weight() == 3 + 16 / 128


def test_int_code_bits_per_instance_and_validation() -> None:
    assert [IntFormat(bits=b).code_bits for b in (2, 3, 5, 8)] == [2, 3, 5, 8]
    for bad in (1, 9):
        with pytest.raises(ValidationError, match=r"2\.\.8 bits"):
            IntFormat(bits=bad)
    with pytest.raises(ValidationError):
        IntFormat(bits=4, scale_dtype="float64")
    assert IntFormat(bits=4).granularity == PerChannel()


def test_int_asymmetric_zero_point_stored_as_uint8() -> None:
    w = weight(4, 64).abs() + 0.5  # all positive: range [0, max], zero at code 0
    qt = IntFormat(bits=4, symmetric=False).quantize(w)
    assert qt.params["zero"].dtype == torch.uint8
    assert (qt.params["zero"] == 0).all()


def test_int_mse_clip_never_worse() -> None:
    w = weight(32, 512, seed=5)
    for sym in (True, False):
        plain = IntFormat(bits=3, symmetric=sym, granularity=128)
        clipped = plain.model_copy(update={"mse_clip": True})
        e_plain = (plain.fake_quantize(w) - w).pow(2).sum()
        e_clip = (clipped.fake_quantize(w) - w).pow(2).sum()
        assert e_clip < e_plain


# ---- NF4 ---------------------------------------------------------------------------------------
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]


def test_nf4_values_are_the_published_constants() -> None:
    assert list(NF4_VALUES) == PUBLISHED_NF4


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_decodes_onto_levels_times_absmax(double_quant: bool) -> None:
    fmt = NF4Format(double_quant=double_quant)
    w = weight(16, 320, seed=7)
    qt = fmt.quantize(w)
    absmax = fmt.load_params(qt.params)["absmax"]  # (16, 5, 1)
    levels = torch.tensor(PUBLISHED_NF4)
    deq = fmt.grouped(qt.dequantize())
    assert torch.equal(deq, levels[fmt.grouped(qt.codes).long()] * absmax)
    # every code is the nearest level to w / absmax
    x = (fmt.grouped(w) / absmax).unsqueeze(-1)
    best = (x - levels).abs().amin(dim=-1)
    chosen = (x.squeeze(-1) - levels[fmt.grouped(qt.codes).long()]).abs()
    assert torch.allclose(chosen, best, atol=1e-6, rtol=0)


def test_nf4_double_quant_reconstructs_absmax() -> None:
    w = weight(256, 1024, seed=8)
    absmax = NF4Format().grouped(w).abs().amax(-1)  # (256, 16)
    stored = double_quantize(absmax)
    assert stored["absmax_q"].dtype == torch.uint8 and stored["absmax_q"].shape == absmax.shape
    assert stored["absmax_scale"].shape == (16,) and stored["absmax_offset"].shape == (1,)
    back = double_dequantize(stored)
    assert float(((back - absmax).abs() / absmax).max()) < 0.01
    # resolution of the dynamic map near 1: 0.9 / 128 of each block's largest centred value
    centred_max = (absmax - absmax.mean()).abs().max()
    assert float((back - absmax).abs().max()) <= float(centred_max) * 0.9 / 128 + 1e-6


def test_nf4_without_double_quant_keeps_fp32_absmax() -> None:
    w = weight(8, 128)
    qt = NF4Format(double_quant=False).quantize(w)
    assert qt.params["absmax"].dtype == torch.float32
    assert torch.equal(qt.params["absmax"], w.reshape(8, 2, 64).abs().amax(-1))


def test_nf4_bits_per_weight() -> None:
    qt = NF4Format().quantize(weight(512, 4096))
    assert 4.12 < qt.bits_per_weight() < 4.2
    assert qt.bits_per_weight() == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-4)
    assert NF4Format(double_quant=False).quantize(weight(64, 256)).bits_per_weight() == 4.5


def test_dynamic_map_matches_bitsandbytes() -> None:
    m = dynamic_map()
    assert m.shape == (256,) and torch.equal(m, m.sort().values) and m.unique().numel() == 256
    assert m[-1] == 1.0 and (m == 0).sum() == 1
    assert float(m[m > 0].min()) == pytest.approx(0.55e-6)  # 10**-6 * mean(0.1, 1)
    assert float(m[0]) == pytest.approx(-(0.1 + 0.9 * 127 / 128))  # top decade, last of 64 bins
    assert (m > 0).sum() == 128 and (m < 0).sum() == 127


def test_nf4_idempotent_without_double_quant() -> None:
    fmt = NF4Format(double_quant=False)
    once = fmt.fake_quantize(weight(16, 256, seed=9))
    assert torch.equal(fmt.fake_quantize(once), once)


# ---- FP8 ---------------------------------------------------------------------------------------
TORCH_FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FMAX = {"e4m3": 448.0, "e5m2": 57344.0}


def same_floats(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal (so -0.0 != 0.0), any NaN equal to any NaN."""
    both_nan = a.isnan() & b.isnan()
    return bool((both_nan | (a.view(torch.int32) == b.view(torch.int32))).all())


def fp8_probe_values(variant: str) -> torch.Tensor:
    """All representable values, every midpoint between neighbours (ties), and random floats."""
    rep = torch.arange(256, dtype=torch.uint8).view(TORCH_FP8[variant]).float()
    rep = rep[rep.isfinite()].unique()  # sorted
    mids = (rep[:-1] + rep[1:]) / 2
    nudged = torch.cat([torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1)])
    g = torch.Generator().manual_seed(0)
    rand = torch.cat([torch.randn(20000, generator=g) * 10.0**e for e in range(-9, 6)])
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e30, -1e-30, 1e-45])
    return torch.cat([rep, mids, nudged, rand, specials])


@pytest.mark.parametrize("variant", ["e4m3", "e5m2"])
def test_fp8_decode_all_codes_matches_torch(variant: str) -> None:
    codes = torch.arange(256, dtype=torch.uint8)
    assert same_floats(decode_fp8(codes, variant), codes.view(TORCH_FP8[variant]).float())


@pytest.mark.parametrize("variant", ["e4m3", "e5m2"])
def test_fp8_encode_matches_torch_cast(variant: str) -> None:
    x = fp8_probe_values(variant)
    ref = x.to(TORCH_FP8[variant]).view(torch.uint8)
    # torch saturates E4M3 (no infinity) and overflows E5M2 to infinity
    assert torch.equal(encode_fp8(x, variant, saturate=variant == "e4m3"), ref)
    clamped = x.clamp(-FMAX[variant], FMAX[variant])
    assert torch.equal(encode_fp8(clamped, variant), clamped.to(TORCH_FP8[variant]).view(torch.uint8))


@settings(max_examples=80, deadline=None)
@given(xs=st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1, max_size=64))
def test_fp8_encode_matches_torch_on_any_float32(xs: list[float]) -> None:
    x = torch.tensor(xs, dtype=torch.float32)
    assert torch.equal(encode_fp8(x, "e4m3"), x.to(torch.float8_e4m3fn).view(torch.uint8))
    assert torch.equal(encode_fp8(x, "e5m2", saturate=False), x.to(torch.float8_e5m2).view(torch.uint8))


def test_fp8_decode_encode_round_trip() -> None:
    for variant in ("e4m3", "e5m2"):
        codes = torch.arange(256, dtype=torch.uint8)
        vals = decode_fp8(codes, variant)
        ok = vals.isfinite()
        assert torch.equal(encode_fp8(vals[ok], variant), codes[ok])


@pytest.mark.parametrize("variant", ["e4m3", "e5m2"])
def test_fp8_format_values_and_scale(variant: str) -> None:
    fmt = FP8Format(variant=variant)
    w = weight(8, 96, seed=4)
    qt = fmt.quantize(w)
    assert qt.params["scale"].dtype == torch.float32
    scale = qt.params["scale"].unsqueeze(-1)  # (8, 1, 1)
    assert torch.equal(qt.params["scale"], w.abs().amax(-1, keepdim=True) / FMAX[variant])
    assert torch.equal(fmt.grouped(qt.dequantize()), decode_fp8(fmt.grouped(qt.codes), variant) * scale)
    assert torch.equal(qt.codes, encode_fp8((fmt.grouped(w) / scale).reshape(8, 96), variant))


# ---- FP4 ---------------------------------------------------------------------------------------
def test_e2m1_table_and_rounding() -> None:
    assert E2M1_VALUES == (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
    codes = torch.arange(16, dtype=torch.uint8)
    vals = decode_e2m1(codes)
    assert vals[:8].tolist() == list(E2M1_VALUES) and vals[8:].tolist() == [-v for v in E2M1_VALUES]
    assert torch.equal(encode_e2m1(vals), codes)  # -0.0 keeps its sign bit
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.75, 9.0, -100.0])
    assert decode_e2m1(encode_e2m1(ties)).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -1.0, 6.0, -6.0]


@settings(max_examples=40, deadline=None)
@given(xs=st.lists(st.floats(-8, 8, width=32), min_size=1, max_size=64))
def test_e2m1_is_nearest(xs: list[float]) -> None:
    x = torch.tensor(xs)
    table = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES))
    best = (x.clamp(-6, 6).unsqueeze(-1) - table).abs().amin(-1)
    assert torch.equal((decode_e2m1(encode_e2m1(x)) - x.clamp(-6, 6)).abs(), best)


def test_mxfp4_power_of_two_scales_and_representable_blocks() -> None:
    fmt = MXFP4Format()
    w = weight(16, 160, seed=11) * 3
    qt = fmt.quantize(w)
    e = qt.params["scale"]
    assert e.dtype == torch.uint8 and e.shape == (16, 5)
    X = fmt.load_params(qt.params)["scale"]  # (16, 5, 1)
    assert torch.equal(X.squeeze(-1), torch.exp2(e.double() - 127).float())
    amax = fmt.grouped(w).abs().amax(-1, keepdim=True)
    assert ((amax / X >= 4) & (amax / X < 8)).all()  # X = 2**(floor(log2 amax) - 2)
    elems = fmt.grouped(qt.dequantize()) / X
    table = torch.tensor(E2M1_VALUES)
    assert torch.isin(elems.abs(), table).all() and elems.abs().amax() <= 6
    assert fmt.quantize(w).bits_per_weight() == 4.25


def test_mxfp4_and_nvfp4_blocks_are_fixed() -> None:
    with pytest.raises(ValidationError, match="blocks of exactly 32"):
        MXFP4Format(granularity=64)
    with pytest.raises(ValidationError, match="blocks of exactly 16"):
        NVFP4Format(granularity="channel")


def test_mxfp4_idempotent() -> None:
    fmt = MXFP4Format()
    once = fmt.fake_quantize(weight(8, 256, seed=12))
    assert torch.equal(fmt.fake_quantize(once), once)


def test_nvfp4_scales_and_error_bound() -> None:
    fmt = NVFP4Format()
    w = weight(32, 256, seed=13)
    qt = fmt.quantize(w)
    assert qt.params["scale"].dtype == torch.uint8 and qt.params["scale"].shape == (32, 16)
    assert torch.equal(qt.params["global_scale"], (w.abs().amax() / (448 * 6)).reshape(1))
    p = fmt.load_params(qt.params)
    block = p["scale"]  # E4M3 values, relative to the global scale, all <= 448
    assert torch.equal(encode_fp8(block, "e4m3"), qt.params["scale"].unsqueeze(-1)) and block.max() <= 448
    eff = block * p["global_scale"]  # (32, 16, 1)
    deq = fmt.grouped(qt.dequantize())
    codes = fmt.grouped(qt.codes)
    assert torch.equal(deq, decode_e2m1(codes) * eff)
    assert torch.equal(codes, encode_e2m1(fmt.grouped(w) / eff))
    # at most half the widest E2M1 gap (1.0 between 4 and 6) of the effective scale, plus the
    # E4M3 rounding of the block scale (relative 2**-4) that can push the block max past 6
    err = (fmt.grouped(w) - deq).abs()
    assert (err <= eff * 1.0 + fmt.grouped(w).abs() * 2**-4).all()
    assert qt.bits_per_weight() == 4 + 8 / 16 + 32 / (32 * 256)  # codes, E4M3 scales, global
