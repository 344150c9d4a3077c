"""Factorised linears: ``LowRankLinear`` (``y = B (A x) + b``) and ``CompensatedLinear``
(``y = Q x + B (A x)``: a quantised weight plus a low-rank correction of its error).

Both hold their factors as ordinary child ``nn.Linear`` modules ``A`` (in -> r, no bias) and ``B``
(r -> out). That is the whole composition story: the rest of modelpress sees two plain linears,
so a later quantisation stage quantises the factors (they become ``QuantLinear`` children), and
saving records the parent and each compressed child in the manifest, parent first; loading
rebuilds the parent with empty (zero) children and then installs the children from their own
entries. ``dequantized_weight()`` gives the dense (out, in) weight the layer stands for, which is
what the hf writer exports for runtimes without factorised layers.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..core.layers import SAVED_LAYERS


def dense_of(m: nn.Module) -> torch.Tensor:
    """(out, in) float weight of a child factor: a plain Linear's weight or a compressed one's."""
    fn = getattr(m, "dequantized_weight", None)
    return (fn() if callable(fn) else m.weight).detach().to(torch.float32)


def _linear(w: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    """A Linear holding exactly ``w`` (out, in) and ``bias`` (no fresh initialisation is computed)."""
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(w.detach().clone().contiguous())
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().clone().contiguous())
    return lin


def _empty_child(out_f: int, in_f: int, bias: bool) -> nn.Linear:
    """A child to be filled by loading: zero tensors of the right shape."""
    return _linear(torch.zeros(out_f, in_f), torch.zeros(out_f) if bias else None)


@SAVED_LAYERS.register("lowrank")
class LowRankLinear(nn.Module):
    """A Linear replaced by ``B @ A`` (+ bias on B).

    Example:
        >>> lin = nn.Linear(8, 6)
        >>> U, s, Vh = torch.linalg.svd(lin.weight.detach())
        >>> lr = LowRankLinear.from_factors(U[:, :6] * s, Vh[:6], lin.bias)
        >>> torch.allclose(lr(torch.ones(2, 8)), lin(torch.ones(2, 8)), atol=1e-5)
        True
    """

    layer_tag = "lowrank"

    def __init__(self, A: nn.Module, B: nn.Module) -> None:
        super().__init__()
        self.A, self.B = A, B  # A: in -> r, B: r -> out
        self.in_features, self.rank, self.out_features = int(A.in_features), int(A.out_features), int(B.out_features)

    @classmethod
    def from_factors(cls, B: torch.Tensor, A: torch.Tensor, bias: torch.Tensor | None) -> "LowRankLinear":
        """B (out, r), A (r, in), bias (out,) or None."""
        return cls(_linear(A), _linear(B, bias))

    @property
    def bias(self) -> torch.Tensor | None:
        return self.B.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        return self.B(self.A(x))  # (..., r) -> (..., out)

    def dequantized_weight(self) -> torch.Tensor:
        """The dense (out, in) weight ``B @ A``."""
        return dense_of(self.B) @ dense_of(self.A)

    def params_kept(self) -> int:
        """Weights stored by the factors, against ``out * in`` for the dense layer."""
        return self.rank * (self.in_features + self.out_features)

    def manifest_entry(self) -> dict[str, Any]:
        return {"shape": [self.out_features, self.in_features], "rank": self.rank, "bias": self.bias is not None,
                "params_kept_fraction": self.params_kept() / (self.out_features * self.in_features)}

    @classmethod
    def from_saved(cls, info: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "LowRankLinear":
        """Placeholder factors of the saved shapes; their tensors (or compressed entries) load next."""
        (out_f, in_f), r = info["shape"], int(info["rank"])
        return cls(_empty_child(r, in_f, False), _empty_child(out_f, r, bool(info["bias"])))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


@SAVED_LAYERS.register("compensated")
class CompensatedLinear(nn.Module):
    """A quantised linear ``base`` plus a rank-r correction: ``y = base(x) + B (A x)``.

    Example:
        >>> from modelpress.quant.formats import IntFormat
        >>> from modelpress.quant.qlinear import QuantLinear
        >>> lin = nn.Linear(8, 4)
        >>> q = QuantLinear.from_linear_weight(IntFormat(bits=4).quantize(lin.weight.detach()), lin.bias)
        >>> c = CompensatedLinear.from_factors(q, torch.zeros(4, 2), torch.zeros(2, 8))
        >>> torch.equal(c(torch.ones(1, 8)), q(torch.ones(1, 8)))
        True
    """

    layer_tag = "compensated"

    def __init__(self, base: nn.Module, A: nn.Module, B: nn.Module) -> None:
        super().__init__()
        self.base, self.A, self.B = base, A, B
        self.in_features, self.out_features = int(base.in_features), int(base.out_features)
        self.rank = int(A.out_features)

    @classmethod
    def from_factors(cls, base: nn.Module, B: torch.Tensor, A: torch.Tensor) -> "CompensatedLinear":
        return cls(base, _linear(A), _linear(B))

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        return self.base(x) + self.B(self.A(x))

    def dequantized_weight(self) -> torch.Tensor:
        """The dense (out, in) weight ``Q + B @ A``."""
        return dense_of(self.base) + dense_of(self.B) @ dense_of(self.A)

    def stored_bytes(self) -> int:
        """Bytes of the quantised base and the factors (bias excluded)."""
        base = self.base.stored_bytes() if hasattr(self.base, "stored_bytes") else 4 * self.in_features * self.out_features
        return base + sum(f.weight.numel() * f.weight.element_size() for f in (self.A, self.B) if hasattr(f, "weight"))

    def manifest_entry(self) -> dict[str, Any]:
        return {"shape": [self.out_features, self.in_features], "rank": self.rank,
                "bits_per_weight": 8.0 * self.stored_bytes() / (self.out_features * self.in_features)}

    @classmethod
    def from_saved(cls, info: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "CompensatedLinear":
        """Placeholders; the base's own manifest entry (a ``QuantLinear``) replaces ``base`` next."""
        (out_f, in_f), r = info["shape"], int(info["rank"])
        return cls(_empty_child(out_f, in_f, False), _empty_child(r, in_f, False), _empty_child(out_f, r, False))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
