"""HessianAccumulator against a float64 product of all tokens at once (the tiled lower-triangle path
included: widths of one, two and several tiles), read mid-way and after further batches."""
import pytest
import torch

from modelpress.calib.stats import SYRK_TILE, HessianAccumulator


@pytest.mark.parametrize("d", [8, SYRK_TILE * 2, SYRK_TILE * 3 + 17])
def test_running_hessian_equals_one_product(d: int) -> None:
    torch.manual_seed(d)
    acc = HessianAccumulator(d)
    seen = []
    for n in (5, 64, 1, 33):
        x = torch.randn(1, n, d) * torch.linspace(0.1, 4.0, d)
        acc.update(x)
        seen.append(x.reshape(-1, d).double())
        X = torch.cat(seen)
        ref = 2 * X.T @ X / X.shape[0]
        H = acc.H
        assert torch.equal(H, H.T)  # both triangles, after every read
        assert float((H.double() - ref).abs().max() / ref.abs().max()) < 1e-6
    assert acc.nsamples == 103
