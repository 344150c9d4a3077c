"""The always-available kernels: the pure-torch reference and its dequantise-once variant.

``reference`` is exactly what :class:`QuantLinear` does (decode the codes on every call, then a
dense matmul): the least memory and the ground truth every other kernel is tested against.
``dense`` decodes once at install time and keeps the float weight (speed at full memory cost);
it is never chosen automatically, only when named.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quant.formats.base import QTensor
from ..quant.qlinear import QuantLinear
from .registry import KERNELS


class KernelLinear(nn.Module, ABC):
    """Base of kernel-backed linears: remembers shape, kernel name and the compute dtype.

    ``forward`` casts the input to the kernel's compute dtype and the result back, so a kernel that
    only runs in bfloat16 still drops into a float32 model.
    """

    kernel_name: ClassVar[str] = "?"

    def __init__(self, out_features: int, in_features: int, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features, self.compute_dtype = out_features, in_features, dtype
        self.bias = nn.Parameter(bias.detach().to(dtype).clone(), requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.compute_dtype).contiguous()  # (tokens, in)
        y = self.matmul(x2)  # (tokens, out)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features).to(x.dtype)

    @abstractmethod
    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """(tokens, in) in ``compute_dtype`` -> (tokens, out): the kernel itself."""

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel_name}, " \
               f"dtype={str(self.compute_dtype).removeprefix('torch.')}"


@KERNELS.register
class ReferenceKernel:
    """Dequantise on every call, then ``F.linear`` (the QuantLinear behaviour)."""

    name = "reference"
    op = "*"  # for every op, install leaves the layer as it is (build is the QuantLinear one)
    formats = ("*",)
    backend = "*"
    priority = 0
    tested = True

    @classmethod
    def unsupported(cls, qt: QTensor, device: torch.device) -> str | None:
        return None

    @classmethod
    def build(cls, qt: QTensor, bias: torch.Tensor | None, device: torch.device,
              dtype: torch.dtype = torch.float32) -> nn.Module:
        return QuantLinear.from_linear_weight(qt, bias).to(device)


class DenseLinear(KernelLinear):
    """A float weight decoded once; ``F.linear`` in ``compute_dtype``."""

    kernel_name = "dense"

    def __init__(self, qt: QTensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__(qt.shape[0], qt.shape[1], bias, dtype)
        self.register_buffer("weight", qt.dequantize(dtype))  # (out, in)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


@KERNELS.register
class DenseKernel:
    """Decode once at install, keep the dense weight (only when named: costs full memory)."""

    name = "dense"
    op = "linear"
    formats = ("*",)
    backend = "*"
    priority = -1
    tested = True

    @classmethod
    def unsupported(cls, qt: QTensor, device: torch.device) -> str | None:
        return None

    @classmethod
    def build(cls, qt: QTensor, bias: torch.Tensor | None, device: torch.device,
              dtype: torch.dtype = torch.float32) -> nn.Module:
        return DenseLinear(qt, bias, dtype).to(device)
