"""The format contract: tensor-wide parameters fitted once, stored == optimised, capabilities as
attributes, methods refusing formats they cannot use when the recipe is loaded."""
from __future__ import annotations

import pytest
import torch

import modelpress as mp
from modelpress.core.errors import ModelpressError
from modelpress.quant.algos.gptq.gptq import gptq_quantize
from modelpress.quant.formats import FP8Format, IntFormat, MXFP4Format, NF4Format, NVFP4Format
from modelpress.quant.formats.base import FORMATS
from modelpress.quant.granularity import PerChannel, PerGroup, PerTensor
from modelpress.sparsity.algos.sparsegpt.sparsegpt import sparsegpt_prune
from modelpress.sparsity.layer import SparseLayer
from modelpress.sparsity.patterns import NM, Block
from tests.conftest import make_tiny_llama

FORMATS_UNDER_TEST = [
    IntFormat(bits=4, granularity=PerGroup(size=32)),
    IntFormat(bits=3, symmetric=False, granularity=PerGroup(size=32)),
    IntFormat(bits=8, granularity=PerChannel()),
    IntFormat(bits=4, granularity=PerTensor()),
    NF4Format(granularity=PerGroup(size=32)),  # double quantisation: tensor-wide offset and scales
    NF4Format(granularity=PerGroup(size=32), double_quant=False),
    FP8Format(),
    MXFP4Format(),
    NVFP4Format(),  # tensor-wide global scale
]
IDS = [f"{f.type}-{i}" for i, f in enumerate(FORMATS_UNDER_TEST)]


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 128, generator=g) * torch.linspace(0.2, 3, 128)  # uneven input scales
    W = torch.randn(48, 128, generator=g)
    W[:, :8] *= 6  # a few wide columns: group parameters move a lot as GPTQ updates the weights
    return W, 2 * X.T @ X / X.shape[0]


def test_every_registered_format_is_under_test():
    assert {f.type for f in FORMATS_UNDER_TEST} >= set(FORMATS.names()) - {"int_fz"}  # int_fz has its own tests


@pytest.mark.parametrize("fmt", FORMATS_UNDER_TEST, ids=IDS)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_stores_exactly_what_it_optimised(problem, fmt, act_order):
    W, H = problem
    res = gptq_quantize(W, H, fmt, blocksize=16, act_order=act_order)
    assert torch.equal(res.qtensor.dequantize(), res.Q)


@pytest.mark.parametrize("fmt", FORMATS_UNDER_TEST, ids=IDS)
def test_sparsegpt_joint_stores_exactly_what_it_optimised(problem, fmt):
    W, H = problem
    res = sparsegpt_prune(W, H, NM(2, 4), blocksize=16, fmt=fmt)
    assert torch.equal(res.qtensor.dequantize(), res.W)
    assert NM(2, 4).violation(res.mask) is None


@pytest.mark.parametrize("fmt", FORMATS_UNDER_TEST, ids=IDS)
def test_groups_fitted_one_by_one_store_what_was_used(problem, fmt):
    """A plan's group-by-group fits, stored, load back to exactly the values each fit returned."""
    W, _ = problem
    wg = fmt.grouped(W)
    plan = fmt.plan(wg)
    parts = [plan.fit(wg[:, g:g + 1], first_group=g) for g in range(wg.shape[1])]
    params = {k: torch.cat([p[k] for p in parts], dim=1) for k in parts[0]}
    back = fmt.load_params(plan.store(params))
    for k, v in back.items():
        torch.testing.assert_close(v.expand_as(params[k]), params[k], rtol=0, atol=0)
    assert torch.equal(fmt.quantize(W).dequantize(), fmt.fake_quantize(W))


def test_capabilities_are_attributes():
    assert IntFormat(bits=4, granularity=PerGroup(size=32)).row_wise
    assert not IntFormat(bits=4, granularity=PerTensor()).row_wise
    assert NVFP4Format().tensor_wide and not NVFP4Format().row_wise
    assert NF4Format().tensor_wide and NF4Format(double_quant=False).row_wise
    assert IntFormat.scale_linear and FP8Format.scale_linear and not NF4Format.scale_linear  # nf4 has no "scale"
    assert all(f.exact_zero for f in FORMATS_UNDER_TEST)


@pytest.mark.parametrize("fmt", FORMATS_UNDER_TEST, ids=IDS)
def test_straight_through_estimator(fmt):
    w = torch.randn(16, 64, requires_grad=True)
    out = fmt.fake_quantize_ste(w)
    assert torch.equal(out.detach(), fmt.fake_quantize(w.detach()))
    out.mul(torch.arange(64.0)).sum().backward()
    assert torch.equal(w.grad, torch.arange(64.0).expand(16, 64))  # identity gradient


@pytest.mark.parametrize("fmt", [{"type": "nvfp4"}, {"type": "nf4", "granularity": 32}], ids=["nvfp4", "nf4-dq"])
def test_gptq_with_tensor_wide_formats_runs_and_reloads(fmt, tmp_path):
    lm = mp.load(make_tiny_llama(seed=1, layers=1))
    calib = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    mp.compress(lm, {"stages": [{"method": "gptq", "format": fmt}]}, calib=calib, progress=False)
    back = mp.load(mp.save(lm, tmp_path / "o"))
    assert torch.equal(lm.module(input_ids=calib).logits, back.module(input_ids=calib).logits)


def test_sparsegpt_nm_blocksize_that_splits_groups_is_refused():
    with pytest.raises(ModelpressError, match="multiple of 4"):
        mp.as_recipe({"stages": [{"method": "sparsegpt", "pattern": "2:4", "blocksize": 6}]})
    X = torch.randn(64, 16)
    with pytest.raises(ModelpressError, match="multiple of 4"):
        sparsegpt_prune(torch.randn(4, 16), X.T @ X, NM(2, 4), blocksize=6)


def test_sparse_layer_refuses_a_mask_that_breaks_its_pattern():
    w = torch.randn(4, 8)
    keep = torch.ones(4, 8, dtype=torch.bool)
    with pytest.raises(ModelpressError, match="2:4"):
        SparseLayer(w, keep, None, pattern=NM(2, 4))
    ok = torch.tensor([1, 1, 0, 0] * 8, dtype=torch.bool).reshape(4, 8)
    layer = SparseLayer(w, ok, None, pattern=NM(2, 4))
    with pytest.raises(ModelpressError, match="keep more than 2"):
        layer.set_mask(keep)
    with pytest.raises(ModelpressError, match="partly kept"):
        SparseLayer(w, ok, None, pattern=Block(2, 4))


def test_a_method_refuses_a_format_it_cannot_use_at_recipe_load():
    class NoZero(IntFormat):
        @property
        def exact_zero(self) -> bool:
            return False

    from modelpress.sparsity.algos.sparsegpt.method import SparseGPTConfig

    with pytest.raises(ValueError, match="cannot use format .* needs a format with exact zero"):
        SparseGPTConfig(pattern="2:4", format=NoZero(bits=4, granularity=PerGroup(size=32)))
