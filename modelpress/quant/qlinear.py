"""``QuantLinear``: a drop-in Linear that stores packed codes and dequantises on the fly.

Its state dict holds only what the format really stores (``qweight`` packed bytes, scales, zero
points), so saving a quantised model writes packed weights, not fp32 copies.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.layers import SAVED_LAYERS
from .formats.base import QTensor, WeightFormat, format_from_dict


_CACHE_DEPTH = 0  # > 0 while some caller wants dequantised weights kept between forwards


@contextlib.contextmanager
def cached_dequant(model: nn.Module | None = None) -> Iterator[None]:
    """Keep each QuantLinear's dequantised weight between forwards while active.

    The reference kernel otherwise unpacks and decodes on every call, which dominates loops that
    run the same block many times (calibration, perplexity). On exit the caches of ``model`` (or of
    every QuantLinear seen) are dropped, so packed storage is all that stays in memory.
    """
    global _CACHE_DEPTH
    _CACHE_DEPTH += 1
    try:
        yield
    finally:
        _CACHE_DEPTH -= 1
        if _CACHE_DEPTH == 0:
            for m in list(QuantLinear._live):
                m._cache = None
            QuantLinear._live.clear()


@SAVED_LAYERS.register("quant")
class QuantLinear(nn.Module):
    """Linear layer with a quantised weight.

    Example:
        >>> from modelpress.quant.formats import IntFormat
        >>> lin = nn.Linear(64, 32)
        >>> q = QuantLinear.from_linear_weight(IntFormat(bits=4).quantize(lin.weight), lin.bias)
        >>> q(torch.randn(2, 64)).shape
        torch.Size([2, 32])
    """

    is_compressed_linear = True
    layer_tag = "quant"
    _live: "set[QuantLinear]" = set()  # layers holding a cache (cleared by cached_dequant)

    def __init__(self, fmt: WeightFormat, shape: tuple[int, int], tensors: dict[str, torch.Tensor],
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        self.fmt = fmt
        self.out_features, self.in_features = int(shape[0]), int(shape[1])
        self._tensor_names = tuple(tensors)
        for k, v in tensors.items():
            self.register_buffer(k, v.contiguous())
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self._cache: torch.Tensor | None = None

    @classmethod
    def from_linear_weight(cls, qt: QTensor, bias: torch.Tensor | None) -> "QuantLinear":
        """Build from a :class:`QTensor` of the (out, in) weight."""
        return cls(qt.fmt, qt.shape, qt.to_tensors(), bias)

    def manifest_entry(self) -> dict[str, Any]:
        """What ``modelpress.json`` records (read back by :meth:`from_saved`)."""
        return {"format": self.fmt.to_dict(), "shape": [self.out_features, self.in_features],
                "bias": self.bias is not None,
                "bits_per_weight": 8.0 * self.stored_bytes() / (self.out_features * self.in_features)}

    @classmethod
    def from_saved(cls, info: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "QuantLinear":
        """Rebuild from a manifest entry and the layer's own tensors (packed codes, parameters, bias)."""
        tensors = dict(tensors)
        bias = tensors.pop("bias", None)
        return cls(format_from_dict(info["format"]), tuple(info["shape"]), tensors, bias)

    def qtensor(self) -> QTensor:
        return QTensor.from_tensors(self.fmt, (self.out_features, self.in_features),
                                    {k: getattr(self, k) for k in self._tensor_names})

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight the codes stand for."""
        return self.qtensor().dequantize(dtype)

    def _weight_for(self, dtype: torch.dtype) -> torch.Tensor:
        if _CACHE_DEPTH == 0:
            return self.dequantized_weight(dtype)
        if self._cache is None or self._cache.dtype != dtype:
            self._cache = self.dequantized_weight(dtype)
            QuantLinear._live.add(self)
        return self._cache

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        w = self._weight_for(x.dtype)  # reference kernel: dequantise then dense matmul
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, w, b)

    def stored_bytes(self) -> int:
        """Bytes of the packed weight and its parameters (bias excluded)."""
        return sum(getattr(self, k).numel() * getattr(self, k).element_size() for k in self._tensor_names)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt.to_dict()}"
