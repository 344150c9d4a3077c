"""Training through a quantised layer: its fake-quantised float form, and back to the packed layer.

A :class:`~modelpress.quant.qlinear.QuantLinear` holds codes, which gradients cannot move. For
training (recovery fine-tuning, distillation into a quantised student) each one is swapped for a
:class:`FakeQuantLinear`: a float weight started at the dequantised weight, used in the forward pass
through the format's quantise-dequantise with a straight-through gradient, on the layer's own grid
(its stored scales and zero points stay fixed). Converting back rounds the trained weight on that
same grid, so the packed layer computes exactly what the fake-quantised layer computed.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .formats.base import Params, QTensor, WeightFormat
from .qlinear import QuantLinear


class FakeQuantLinear(nn.Module):
    """A trainable float weight seen through a fixed quantisation grid (straight-through gradient).

    Example:
        >>> from modelpress.quant.formats import IntFormat
        >>> q = QuantLinear.from_linear_weight(IntFormat(bits=4).quantize(torch.randn(8, 64)), None)
        >>> f = FakeQuantLinear.from_quant(q)
        >>> x = torch.randn(2, 64)
        >>> torch.equal(f(x), q(x)), torch.equal(f.to_quant()(x), q(x))
        (True, True)
    """

    def __init__(self, fmt: WeightFormat, weight: torch.Tensor, stored: Params, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.fmt = fmt
        # fixed: the grid the packed layer has, stored and compute forms (buffers: they follow .to())
        for prefix, ps in (("stored_", stored), ("params_", fmt.load_params(stored))):
            for k, v in ps.items():
                self.register_buffer(prefix + k, v, persistent=False)
        self._stored_keys, self._param_keys = tuple(stored), tuple(fmt.load_params(stored))
        self.weight = nn.Parameter(weight.detach().to(torch.float32).clone())
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad) if bias is not None else None

    @property
    def stored(self) -> Params:
        return {k: getattr(self, "stored_" + k) for k in self._stored_keys}

    @property
    def params(self) -> Params:
        return {k: getattr(self, "params_" + k) for k in self._param_keys}

    @classmethod
    def from_quant(cls, q: QuantLinear) -> "FakeQuantLinear":
        qt = q.qtensor()
        return cls(q.fmt, qt.dequantize(torch.float32), qt.params, q.bias)

    def quantized_weight(self) -> torch.Tensor:
        """The weight the forward pass uses (on the grid; gradient straight through to ``weight``)."""
        return self.fmt.fake_quantize_ste(self.weight, self.params)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.quantized_weight().to(x.dtype)
        return F.linear(x, w, self.bias.to(x.dtype) if self.bias is not None else None)

    def to_quant(self) -> QuantLinear:
        """The packed layer holding exactly the grid point the forward pass used for every weight."""
        qt: QTensor = self.fmt.quantize(self.weight.detach(), stored=self.stored)
        return QuantLinear.from_linear_weight(qt, self.bias)


def _swap(model: nn.Module, kind: type, convert: Callable[[nn.Module], nn.Module]) -> int:
    """Replace every ``kind`` child by ``convert(child)``, a shared child by one replacement; how many."""
    done: dict[int, nn.Module] = {}
    for mod in list(model.modules()):
        for child_name, child in list(mod._modules.items()):  # (named_children skips a repeated child)
            if isinstance(child, kind):
                setattr(mod, child_name, done.setdefault(id(child), convert(child)))
    return len(done)


def unpack_for_training(model: nn.Module) -> int:
    """Swap every QuantLinear of ``model`` for its FakeQuantLinear (shared modules once); how many."""
    return _swap(model, QuantLinear, FakeQuantLinear.from_quant)


def pack_after_training(model: nn.Module) -> int:
    """Swap every FakeQuantLinear back for the packed layer on its grid; how many."""
    return _swap(model, FakeQuantLinear, lambda f: f.to_quant())


@contextmanager
def trainable_quantised(model: nn.Module) -> Iterator[int]:
    """Within the block, ``model``'s quantised layers train through their fake-quantised form
    (yields how many); on leaving, each is packed back on its own grid."""
    n = unpack_for_training(model)
    try:
        yield n
    finally:
        pack_after_training(model)
