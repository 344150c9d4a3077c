"""SparseLayer: masks survive training, tightening, compact save/load, dense conversion, 2:4 runtime."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from modelpress.sparsity.layer import SparseLayer, densify
from modelpress.sparsity.masks import mask_from_scores
from modelpress.sparsity.patterns import NM, Unstructured
from modelpress.sparsity.runtime import accelerate_2of4


def _sparse_linear(seed: int = 0, pattern=NM(2, 4)) -> tuple[nn.Linear, SparseLayer, torch.Tensor]:
    torch.manual_seed(seed)
    lin = nn.Linear(32, 16)
    mask = mask_from_scores(lin.weight.abs(), pattern, None if isinstance(pattern, NM) else 0.5)
    return lin, SparseLayer.from_module(lin, mask, pattern), mask


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_zeros_stay_zero_after_optimizer_steps(opt: str) -> None:
    _, sl, mask = _sparse_linear()
    params = list(sl.parameters())
    o = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01) if opt == "sgd" \
        else torch.optim.AdamW(params, lr=0.05, weight_decay=0.1)
    x, y = torch.randn(64, 32), torch.randn(64, 16)
    before = sl.effective_weight().detach().clone()
    for _ in range(5):
        o.zero_grad()
        F.mse_loss(sl(x), y).backward()
        assert bool((sl.weight.grad[~mask] == 0).all())
        o.step()
    w = sl.effective_weight()
    assert bool((w[~mask] == 0).all()) and bool((sl.weight[~mask] == 0).all())
    assert not torch.equal(w[mask], before[mask])  # the kept weights did train
    assert ((w == 0).reshape(16, 8, 4).sum(-1) >= 2).all()


def test_mask_enforced_even_if_weight_is_written() -> None:
    _, sl, mask = _sparse_linear()
    with torch.no_grad():
        sl.weight.fill_(1.0)  # e.g. stale optimizer state writing into pruned entries
    x = torch.randn(3, 32)
    assert torch.allclose(sl(x), F.linear(x, mask.float(), sl.bias))


def test_update_tightens_schedule_step_by_step() -> None:
    _, sl, _ = _sparse_linear(pattern=Unstructured())
    prev = sl.mask.clone()
    for s in (0.6, 0.7, 0.8):
        scores = torch.randn_like(sl.weight)  # e.g. accumulated movement scores
        mask = sl.update(scores, s)
        assert bool((mask <= prev).all()) and sl.sparsity() == pytest.approx(round(s * 32) / 32)  # per row
        assert bool((sl.weight[~mask] == 0).all())
        prev = mask.clone()


def test_state_dict_is_compact_and_bit_exact() -> None:
    _, sl, mask = _sparse_linear()
    sd = sl.state_dict()
    assert set(sd) == {"bitmask", "values", "bias"}
    assert sd["values"].numel() == int(mask.sum()) and sd["bitmask"].shape == (16, 4)
    other = SparseLayer.from_module(nn.Linear(32, 16), torch.ones(16, 32, dtype=torch.bool))
    other.load_state_dict(sd)
    assert torch.equal(other.effective_weight().view(torch.int32), sl.effective_weight().view(torch.int32))
    assert torch.equal(other.mask, sl.mask)
    with pytest.raises(RuntimeError, match="values"):
        other.load_state_dict({"bitmask": sd["bitmask"], "bias": sd["bias"]})


def test_conv2d_and_conv1d_match_dense_references() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, stride=2, padding=1)
    cm = mask_from_scores(conv.weight.abs(), Unstructured(), 0.5)
    sc = SparseLayer.from_module(conv, cm)
    x = torch.randn(2, 4, 9, 9)
    ref = F.conv2d(x, conv.weight * cm, conv.bias, stride=2, padding=1)
    assert torch.allclose(sc(x), ref, atol=1e-6)
    dense = sc.to_dense()
    assert isinstance(dense, nn.Conv2d) and torch.allclose(dense(x), ref, atol=1e-6)

    c1 = Conv1D(12, 8)  # nf=12 outputs, nx=8 inputs, weight (8, 12)
    m1 = mask_from_scores(c1.weight.t().abs(), NM(2, 4))
    s1 = SparseLayer.from_module(c1, m1)
    z = torch.randn(5, 8)
    assert torch.allclose(s1(z), z @ (c1.weight * m1.t()) + c1.bias, atol=1e-6)
    d1 = s1.to_dense()
    assert type(d1).__name__ == "Conv1D" and torch.allclose(d1(z), s1(z), atol=1e-6)


def test_densify_restores_plain_layers() -> None:
    lin, sl, mask = _sparse_linear()
    model = nn.Sequential(sl, nn.ReLU())
    x = torch.randn(4, 32)
    y = model(x)
    assert densify(model) == 1 and isinstance(model[0], nn.Linear)
    assert torch.equal(model[0].weight, lin.weight * mask) and torch.allclose(model(x), y)


def test_2of4_acceleration_falls_back_to_dense_on_cpu_and_says_so() -> None:
    _, sl, _ = _sparse_linear()
    model = nn.Sequential(sl)
    x = torch.randn(2, 32)
    y = model(x)
    seen: list[str] = []
    rep = accelerate_2of4(model, seen.append)
    assert rep.accelerated == [] and "cpu has no 2:4 sparse tensor cores" in rep.dense["0"]
    assert seen and "dense kernel" in seen[0]
    assert model[0] is sl and torch.equal(model(x), y)  # unchanged, still dense
    with pytest.warns(UserWarning, match="2:4 acceleration unavailable"):
        accelerate_2of4(model)
