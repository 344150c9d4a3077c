"""FakeQuantLinear: trains on the packed layer's grid and packs back to exactly what it computed."""
from __future__ import annotations

import pytest
import torch

from modelpress.quant.fake import FakeQuantLinear, trainable_quantised
from modelpress.quant.formats import format_from_dict
from modelpress.quant.qlinear import QuantLinear

FORMATS = [
    {"type": "int", "bits": 4, "granularity": 64, "symmetric": False},
    {"type": "int", "bits": 3, "granularity": 32},
    {"type": "int", "bits": 8},
    {"type": "nf4", "granularity": 64, "double_quant": True},
    {"type": "fp8"},
    {"type": "int_fz", "bits": 4, "granularity": 64},
    {"type": "nvfp4"},
    {"type": "mxfp4"},
]


@pytest.mark.parametrize("spec", FORMATS, ids=lambda s: "-".join(str(v) for v in s.values()))
def test_train_then_pack_equals_the_fake_quantised_layer(spec):
    torch.manual_seed(0)
    fmt = format_from_dict(spec)
    q = QuantLinear.from_linear_weight(fmt.quantize(torch.randn(32, 128)), torch.randn(32))
    fq = FakeQuantLinear.from_quant(q)
    x, target = torch.randn(16, 128), torch.randn(16, 32)
    assert torch.equal(fq(x), q(x))  # starts as the packed layer
    opt = torch.optim.SGD(fq.parameters(), lr=0.5)
    for _ in range(10):
        loss = (fq(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        assert fq.weight.grad is not None and fq.weight.grad.abs().sum() > 0  # straight through
        opt.step()
    back = fq.to_quant()
    assert torch.equal(back(x), fq(x))  # packed == fake-quantised, bit for bit
    assert not torch.equal(back.dequantized_weight(), q.dequantized_weight())  # training moved it
    for k, v in q.qtensor().params.items():
        assert torch.equal(back.qtensor().params[k], v), k  # on the layer's own grid


def test_context_swaps_shared_layers_once_and_restores_packed():
    fmt = format_from_dict({"type": "int", "bits": 4, "granularity": 32})
    q = QuantLinear.from_linear_weight(fmt.quantize(torch.randn(8, 64)), None)
    model = torch.nn.Sequential(q, torch.nn.ReLU(), q)  # the same layer twice
    with trainable_quantised(model) as n:
        assert n == 1 and isinstance(model[0], FakeQuantLinear) and model[0] is model[2]
    assert isinstance(model[0], QuantLinear) and model[0] is model[2]
