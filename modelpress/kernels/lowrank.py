"""Kernels for factorised layers (op ``lowrank``): ``LowRankLinear`` and the correction of ``CompensatedLinear``.

A rank-r pair ``B (out, r) @ A (r, in)`` costs ``r * (out + in)`` multiply-adds per token run as two
matmuls, against ``out * in`` for the merged weight. Below the break-even rank
``out * in / (out + in)`` the factors are both smaller and cheaper; at or above it the merged weight
is (and it is exact up to rounding), so:

- ``lowrank-merged`` (auto first) takes a pair at or above the break-even and keeps ``B @ A`` as one
  dense weight (one matmul per call);
- ``lowrank-factored`` takes any float pair and runs the two matmuls.

The rule never trades memory for speed: below the break-even a merged weight would be larger than
the factors. Per-call overhead is left out of it on purpose, though it moves the speed crossover:
at batch 1 on one AVX-512 core (torch 2.13) a bf16 matmul costs ~15 us fixed against ~3 us in fp32,
so for 1536x576 in bf16 merged is already faster from ~0.7x the break-even rank
(``bench/lowrank_kernel_speed.py --ranks``), at up to 1.4x the factors' memory.

Both cast the factors to the kernel dtype once, at install. Only float factors are this op's weight:
factors that a later stage quantised (``QuantLinear`` children) and the quantised base of a
``CompensatedLinear`` are ``linear`` weights and get their own format kernels (int4pack ...), which
:func:`~modelpress.kernels.install.install_kernels` installs first.

Example:
    >>> lr = LowRankLinear.from_factors(torch.randn(64, 8), torch.randn(8, 128), None)
    >>> pair = FactorPair.of(lr)
    >>> round(pair.break_even, 1), KERNELS.get("lowrank-merged").unsupported(pair, torch.device("cpu")) is None
    (42.7, False)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..lowrank.layer import CompensatedLinear, LowRankLinear
from ..quant.qlinear import QuantLinear
from .reference import KernelLinear
from .registry import KERNELS

OP = "lowrank"


@dataclass(frozen=True)
class FactorPair:
    """What ``lowrank`` kernels take: the float factors of one layer, ``W = B @ A``."""

    B: torch.Tensor  # (out, r)
    A: torch.Tensor  # (r, in)
    format_tag: ClassVar[str] = "float"  # the key kernels' ``formats`` match (see registry.format_tag)

    @classmethod
    def of(cls, layer: LowRankLinear | CompensatedLinear) -> "FactorPair":
        return cls(layer.B.weight.detach(), layer.A.weight.detach())

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.B.shape[0]), int(self.A.shape[1])

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def break_even(self) -> float:
        """The rank at which the two matmuls cost what the merged one does: ``out * in / (out + in)``."""
        n, k = self.shape
        return n * k / (n + k)


def _float_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) and not isinstance(m, QuantLinear) and m.weight.is_floating_point()


def factored_layers(model: nn.Module) -> list[tuple[str, LowRankLinear | CompensatedLinear]]:
    """(name, layer) of every factorised layer whose two factors are float linears."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (LowRankLinear, CompensatedLinear)) and _float_linear(m.A) and _float_linear(m.B)]


class _PairLinear(KernelLinear):
    """Float kernel linears whose ``matmul`` fuses the bias and takes any leading dims (``F.linear`` does).

    Why its own ``forward``: at batch 1 a ~50 us call pays visibly for the base class's reshapes,
    ``contiguous`` and separate bias add (measured ~4% on a 1536x576 layer, fp32, 1 thread).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        return self.matmul(x.to(self.compute_dtype), self.bias).to(x.dtype)


class FactoredLinear(_PairLinear):
    """``(x @ A.T) @ B.T + bias`` with both factors in ``compute_dtype``."""

    kernel_name = "lowrank-factored"

    def __init__(self, pair: FactorPair, bias: torch.Tensor | None, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(*pair.shape, bias, dtype)
        self.register_buffer("A", pair.A.to(device, dtype).contiguous())  # (r, in)
        self.register_buffer("B", pair.B.to(device, dtype).contiguous())  # (out, r)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(F.linear(x, self.A), self.B, bias)  # (.., in) -> (.., r) -> (.., out)


class MergedLinear(_PairLinear):
    """``x @ (B @ A).T + bias``: the product formed once in float32, then rounded to ``compute_dtype``."""

    kernel_name = "lowrank-merged"

    def __init__(self, pair: FactorPair, bias: torch.Tensor | None, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(*pair.shape, bias, dtype)
        self.register_buffer("weight", (pair.B.float() @ pair.A.float()).to(device, dtype))  # (out, in)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:  # (.., in) -> (.., out)
        return F.linear(x, self.weight, bias)


class CorrectedLinear(nn.Module):
    """``base(x) + correction(x)``: a CompensatedLinear once both parts run on their kernels.

    Why a container: the base keeps the module its own format kernel gave it (a plan row of its
    own), and the correction stays a leaf, so memory and bytes-read accounting sees its buffers.
    """

    def __init__(self, base: nn.Module, correction: nn.Module) -> None:
        super().__init__()
        self.base, self.correction = base, correction
        self.in_features, self.out_features = int(base.in_features), int(base.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        return self.base(x) + self.correction(x)


def install_pair(layer: LowRankLinear | CompensatedLinear, correction: nn.Module) -> nn.Module:
    """What replaces ``layer`` once its factor pair became the kernel module ``correction``."""
    return CorrectedLinear(layer.base, correction) if isinstance(layer, CompensatedLinear) else correction


@KERNELS.register
class LowRankMergedKernel:
    """A float pair at or above the break-even rank, merged into one dense weight."""

    name = "lowrank-merged"
    op = OP
    formats = ("float",)
    backend = "cpu"
    priority = 20
    tested = True

    @classmethod
    def unsupported(cls, pair: FactorPair, device: torch.device) -> str | None:
        if pair.rank < pair.break_even:
            return (f"rank {pair.rank} is below the break-even {pair.break_even:.0f} of a "
                    f"{pair.shape[0]}x{pair.shape[1]} weight: the factors are smaller and cheaper than B @ A")
        return None

    @classmethod
    def build(cls, pair: FactorPair, bias: torch.Tensor | None, device: torch.device,
              dtype: torch.dtype = torch.bfloat16) -> nn.Module:
        return MergedLinear(pair, bias, device, dtype)


@KERNELS.register
class LowRankFactoredKernel:
    """Any float pair, run as two matmuls in the kernel dtype."""

    name = "lowrank-factored"
    op = OP
    formats = ("float",)
    backend = "cpu"
    priority = 10
    tested = True

    @classmethod
    def unsupported(cls, pair: FactorPair, device: torch.device) -> str | None:
        return None

    @classmethod
    def build(cls, pair: FactorPair, bias: torch.Tensor | None, device: torch.device,
              dtype: torch.dtype = torch.bfloat16) -> nn.Module:
        return FactoredLinear(pair, bias, device, dtype)
