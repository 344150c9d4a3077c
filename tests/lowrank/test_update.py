"""SVD-LLM's layer-wise closed-form update (``svdllm-update``): the refit is the least-squares
solution, it changes nothing where the two streams agree, and the layer the stage installs last
is the least-squares fit of the float layer's outputs on the float stream, checked by brute force
on activations captured independently from the original and the compressed model."""
from __future__ import annotations

import copy

import pytest
import torch

import modelpress as mp
from modelpress.lowrank.factor import whitened_factor
from modelpress.lowrank.layer import LowRankLinear
from modelpress.lowrank.update import anchored_rel_error, refit_left
from tests.conftest import make_tiny_llama

CALIB = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(1))


def test_refit_is_the_least_squares_solution_and_never_raises_the_anchored_error():
    g = torch.Generator().manual_seed(0)
    Xf = torch.randn(200, 12, generator=g, dtype=torch.float64)
    Xc = Xf + 0.3 * torch.randn(200, 12, generator=g, dtype=torch.float64)  # a drifted stream
    W = torch.randn(7, 12, generator=g, dtype=torch.float64)
    f = whitened_factor(W, Xc.T @ Xc, 4)
    B = refit_left(W, f.A, Xf.T @ Xc, Xc.T @ Xc)
    ref = torch.linalg.lstsq(Xc @ f.A.T, Xf @ W.T).solution.T
    assert torch.allclose(B, ref, atol=1e-8)
    direct = lambda M: float((Xf @ W.T - Xc @ M.T).norm() / (Xf @ W.T).norm())  # noqa: E731
    before = anchored_rel_error(W, f.B @ f.A, Xf.T @ Xf, Xf.T @ Xc, Xc.T @ Xc)
    after = anchored_rel_error(W, B @ f.A, Xf.T @ Xf, Xf.T @ Xc, Xc.T @ Xc)
    assert before == pytest.approx(direct(f.B @ f.A), rel=1e-6) and after == pytest.approx(direct(B @ f.A), rel=1e-6)
    assert after < before


def test_refit_keeps_svdllms_truncation_where_the_streams_agree():
    """With X_f = X_c, SVD-LLM's whitened truncation is already the optimal rank-r fit: the refit is a no-op."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(300, 10, generator=g, dtype=torch.float64) @ torch.randn(10, 10, generator=g, dtype=torch.float64)
    W = torch.randn(6, 10, generator=g, dtype=torch.float64)
    f = whitened_factor(W, X.T @ X, 3)
    assert torch.allclose(refit_left(W, f.A, X.T @ X, X.T @ X, damp=0.0), f.B, atol=1e-8)


def _inputs_of(model: torch.nn.Module, name: str, ids: torch.Tensor) -> torch.Tensor:
    got = []
    h = model.get_submodule(name).register_forward_pre_hook(lambda _m, a: got.append(a[0].detach()))
    with torch.no_grad():
        for row in ids:  # the engine's batches: one calibration sequence each
            model(input_ids=row[None])
    h.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in got]).double()


def test_last_layer_is_the_brute_force_least_squares_fit_to_the_float_layer(tmp_path):
    base = make_tiny_llama(layers=2, hidden=64, inter=128)
    lm = mp.load(copy.deepcopy(base))
    rep = mp.compress(lm, {"name": "t", "stages": [{"method": "svdllm-update", "param_ratio": 0.8}]}, calib=CALIB,
                      progress=False)
    name = "model.layers.1.mlp.down_proj"  # the last layer fitted: everything before it was already compressed
    layer = lm.module.get_submodule(name)
    assert isinstance(layer, LowRankLinear)
    Xf, Xc = _inputs_of(base, name, CALIB), _inputs_of(lm.module, name, CALIB)
    assert float((Xf - Xc).norm() / Xf.norm()) > 1e-3  # the streams really drifted
    W = base.get_submodule(name).weight.detach().double()
    A = layer.A.weight.detach().double()
    B_ref = torch.linalg.lstsq(Xc @ A.T, Xf @ W.T).solution.T
    assert torch.allclose(layer.B.weight.detach().double(), B_ref, rtol=1e-3, atol=1e-4)
    row = next(r for r in rep["layers"] if r["name"] == name)
    assert any("closed-form update" in n for n in row["notes"])
    # saved and reloaded: the same outputs
    mp.save(lm, tmp_path / "out")
    back = mp.load(tmp_path / "out")
    ids = CALIB[:2]
    with torch.no_grad():
        assert torch.equal(lm.module(input_ids=ids).logits, back.module(input_ids=ids).logits)
