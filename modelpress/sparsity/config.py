"""Fields shared by every pruning stage: the pattern, how sparse, how the result is stored."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from ..core.method import MethodConfig
from .patterns import NM, PatternField, SparsityPattern, Structured, Unstructured


class PruneConfig(MethodConfig):
    """Base config of elementwise pruning methods.

    Fields:
        pattern: ``unstructured`` (default), ``"2:4"`` / ``{type: nm, n: 2, m: 4}``, ``"16x16"`` (block).
        sparsity: fraction of zeros in [0, 1); implied by an N:M pattern (0.5 otherwise when omitted).
        storage: ``bitmask`` (compact file, masks enforced in later training) or ``dense`` (plain
            layers holding zeros: the file loads in plain ``transformers`` but does not shrink).

    Example:
        >>> PruneConfig(method="x", pattern="2:4").target_sparsity()
        0.5
    """

    pattern: PatternField = Unstructured()
    sparsity: float | None = Field(None, description="fraction of zeros; implied by N:M")
    storage: Literal["bitmask", "dense"] = "bitmask"

    @field_validator("pattern")
    @classmethod
    def _elementwise(cls, p: SparsityPattern) -> SparsityPattern:
        if isinstance(p, Structured):
            raise ValueError(f"pattern {p.kind!r} is structured: use a structured pruning method")
        return p

    @field_validator("sparsity")
    @classmethod
    def _in_range(cls, s: float | None, info: ValidationInfo) -> float | None:
        if s is not None and not 0.0 <= s < 1.0:
            raise ValueError(f"sparsity must lie in [0, 1), got {s}")
        p = info.data.get("pattern")
        if s is not None and isinstance(p, NM) and abs(s - p.fixed_sparsity()) > 1e-9:
            raise ValueError(f"pattern {p.n}:{p.m} implies sparsity {p.fixed_sparsity():g}; "
                             "drop sparsity or make them agree")
        return s

    def target_sparsity(self) -> float:
        """The sparsity every layer gets unless a method allocates per layer."""
        fixed = self.pattern.fixed_sparsity()
        return fixed if fixed is not None else (0.5 if self.sparsity is None else self.sparsity)
