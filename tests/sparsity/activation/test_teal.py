"""TEAL: calibrated thresholds hit the target on held-out data; sparse forward = dense on thresholded input;
skipped work counted exactly; the wrapped model evaluates, saves and reloads."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import modelpress as mp
from modelpress.core.errors import ModelpressError
from modelpress.eval.perplexity import perplexity
from modelpress.export.saving import load_compressed
from modelpress.sparsity.activation import ThresholdLinear, column_sparse_linear, magnitude_threshold, measure_mlp
from tests.conftest import make_tiny_llama


@pytest.mark.parametrize("target", [0.25, 0.4, 0.5, 0.9])
def test_threshold_hits_target_on_held_out_samples(target):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.distributions.StudentT(3.0).sample((40000, 32)) * torch.rand(32, generator=g)  # heavy tails, per-channel scale
    calib, held_out = x[:20000], x[20000:]
    t = magnitude_threshold(calib.abs(), target)
    achieved = float((held_out.abs() <= t).float().mean())
    assert abs(achieved - target) < 0.005


def test_threshold_is_the_order_statistic():
    assert magnitude_threshold(torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0]), 0.4) == 2.0
    with pytest.raises(ModelpressError, match=r"\[0, 1\)"):
        magnitude_threshold(torch.ones(3), 1.0)


def test_sparse_forward_equals_dense_on_thresholded_input():
    torch.manual_seed(0)
    lin = nn.Linear(48, 20).double()
    t = 0.7
    wrapped = ThresholdLinear(copy.deepcopy(lin), t)
    x = torch.randn(3, 5, 48, dtype=torch.double)
    # independent reference: zero the small inputs by hand, then a dense product
    x_ref = x.clone()
    x_ref[x_ref.abs() <= t] = 0.0
    ref = x_ref @ lin.weight.T + lin.bias
    assert torch.allclose(wrapped(x), ref, atol=1e-12)  # batch path
    for i, tok in enumerate(x.reshape(-1, 48)):  # single-token (decode) path reads only the needed columns
        assert torch.allclose(wrapped(tok[None])[0], ref.reshape(-1, 20)[i], atol=1e-12)
    assert torch.allclose(column_sparse_linear(x_ref, lin.weight, lin.bias), ref, atol=1e-12)


def test_skipped_macs_counted_by_hand_on_one_layer():
    lin = ThresholdLinear(nn.Linear(4, 3), 0.5)
    x = torch.tensor([[0.1, -0.7, 0.0, 2.0],   # zeroed: 0.1, 0.0 -> 2
                      [1.0, 1.0, -0.2, 0.5]])  # zeroed: -0.2, 0.5 (|x| <= t) -> 2
    lin(x)
    assert (lin.zeros, lin.entries) == (4, 8)
    assert (lin.skipped_macs, lin.dense_macs) == (4 * 3, 8 * 3)


@pytest.mark.parametrize("threshold,expected", [(1e9, 1 / 3), (-1.0, 0.0)])
def test_mlp_skipped_fraction_by_hand(threshold, expected):
    """Only down_proj wrapped: all (or none) of its inputs zeroed skips 16*8 of 3*8*16 MACs per token."""
    model = make_tiny_llama(layers=1, hidden=8, inter=16)
    lm = mp.load(model)
    mlp = model.model.layers[0].mlp
    mlp.down_proj = ThresholdLinear(mlp.down_proj, threshold)
    with measure_mlp(lm) as r:
        model(input_ids=torch.randint(0, 300, (2, 7)))
    assert r.tokens == 14
    assert r.dense_macs == 14 * (8 * 16 + 8 * 16 + 16 * 8)
    assert r.skipped_macs == round(expected * r.dense_macs)


def _teal_lm(sparsity: float = 0.4, seed: int = 0):
    lm = mp.load(make_tiny_llama(seed=seed))
    calib = torch.randint(0, 300, (16, 64), generator=torch.Generator().manual_seed(1))
    rep = mp.compress(lm, {"name": "t", "stages": [{"method": "teal", "sparsity": sparsity}]}, calib=calib, progress=False)
    return lm, rep


def test_recipe_calibrates_every_input_and_holds_on_held_out_tokens():
    lm, rep = _teal_lm(0.4)
    wrapped = [n for n, m in lm.module.named_modules() if isinstance(m, ThresholdLinear)]
    assert len(wrapped) == 2 * 7 and len(rep["layers"]) == 14
    held_out = torch.randint(0, 300, (1, 1024), generator=torch.Generator().manual_seed(2))
    with measure_mlp(lm) as r:
        perplexity(lm.module, held_out[0], 128)  # the wrapped model goes through the evaluator
    for role, s in r.input_sparsity.items():
        assert abs(s - 0.4) < 0.05, (role, s)
    # gate/up zero 40% of 2*d*I MACs, down 40% of I*d: about 40% of all MLP MACs
    assert abs(r.skipped_fraction - 0.4) < 0.05


def test_q_k_v_share_one_threshold():
    lm, _ = _teal_lm(0.4)
    attn = lm.module.model.layers[1].self_attn
    assert float(attn.q_proj.threshold) == float(attn.k_proj.threshold) == float(attn.v_proj.threshold)
    assert float(attn.q_proj.threshold) != float(attn.o_proj.threshold)


def test_save_and_reload_gives_same_logits(tmp_path):
    lm, _ = _teal_lm(0.5)
    ids = torch.randint(0, 300, (1, 40))
    before = lm.module(input_ids=ids).logits
    back = load_compressed(mp.save(lm, tmp_path / "teal", recipe={"name": "t", "stages": [{"method": "teal"}]}))
    assert isinstance(back.module.model.layers[0].mlp.down_proj, ThresholdLinear)
    assert torch.equal(before, back.module(input_ids=ids).logits)


def test_sparsity_outside_range_is_rejected():
    with pytest.raises(ModelpressError, match="sparsity"):
        mp.as_recipe({"name": "t", "stages": [{"method": "teal", "sparsity": 1.0}]})


def test_teal_after_quantisation_wraps_the_quantised_layer():
    lm = mp.load(make_tiny_llama(seed=5))
    calib = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(1))
    mp.compress(lm, {"name": "q+t", "stages": [{"method": "rtn", "format": {"type": "int", "bits": 8}},
                                                {"method": "teal", "sparsity": 0.3}]}, calib=calib, progress=False)
    down = lm.module.model.layers[0].mlp.down_proj
    assert isinstance(down, ThresholdLinear) and type(down.inner).__name__ == "QuantLinear"
    x = torch.randn(6, 128)
    ref = F.linear(x * (x.abs() > down.threshold), down.inner.dequantized_weight())
    assert torch.allclose(down(x), ref, atol=1e-5)
