"""Sparsity patterns as types: ``Unstructured``, ``NM(n, m)``, ``Block(r, c)``, ``Structured(kind)``.

A pattern says *which shapes of zeros* are allowed; the method config says *how many* (``sparsity``)
and *which weights* (the scores). In a recipe a pattern is written as a mapping with a ``type`` tag,
or in short: ``unstructured``, ``"2:4"`` (N:M) or ``"16x16"`` (block).

Conventions:

* ``NM(n, m)``: at most ``n`` nonzeros in every ``m`` consecutive weights along the input dimension
  (NVIDIA's 2:4 keeps 2 of 4, so 50%; ``1:4`` keeps 1 of 4, so 75%). The sparsity is ``1 - n/m``.
* ``Block(r, c)``: weights are kept or zeroed in whole ``r x c`` tiles of the (out, in) matrix.
* A Conv2d weight (out, in, kh, kw) is viewed as (out, in * kh * kw).

Example:
    >>> pattern_from_dict("2:4")
    NM(type='nm', n=2, m=4)
    >>> Block(rows=4, cols=4).check_shape((8, 12), "q_proj")
"""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import torch
from pydantic import BeforeValidator, Field, SerializeAsAny, model_validator

from ..core.config import Config, Registry, tagged
from ..core.errors import ModelpressError

#: ``type`` tag -> pattern class. Each pattern registers itself here.
PATTERNS: Registry[type["SparsityPattern"]] = Registry("sparsity pattern")


class SparsityPattern(Config):
    """Base of sparsity patterns: a frozen, tagged config."""

    type: str

    def fixed_sparsity(self) -> float | None:
        """The sparsity the pattern itself implies (N:M), or None when the method chooses it."""
        return None

    def check_shape(self, shape: tuple[int, ...], layer: str) -> None:
        """Raise a one-line :class:`ModelpressError` naming ``layer`` if the pattern cannot tile ``shape``."""

    def violation(self, keep: torch.Tensor) -> str | None:
        """Why the keep-mask ``keep`` (weight-shaped bool) breaks this pattern, or None when it holds."""
        return None

    @property
    def label(self) -> str:
        """Short name for messages: ``2:4``, ``16x16``, ``unstructured``."""
        return self.type


@PATTERNS.register("unstructured")
class Unstructured(SparsityPattern):
    """Any weight may be zeroed."""

    type: Literal["unstructured"] = "unstructured"


@PATTERNS.register("nm")
class NM(SparsityPattern):
    """At most ``n`` nonzeros in each run of ``m`` consecutive input weights (2:4, 4:8, 1:4)."""

    type: Literal["nm"] = "nm"
    n: int = Field(ge=1)
    m: int = Field(ge=1)

    def __init__(self, n: int | None = None, m: int | None = None, /, **data: Any) -> None:
        """Allow ``NM(2, 4)`` as well as ``NM(n=2, m=4)``."""
        if n is not None:
            data["n"] = n
        if m is not None:
            data["m"] = m
        super().__init__(**data)

    @model_validator(mode="after")
    def _n_le_m(self) -> "NM":
        if self.n > self.m:
            raise ValueError(f"N:M sparsity needs N <= M, got {self.n}:{self.m}")
        return self

    def fixed_sparsity(self) -> float:
        return 1.0 - self.n / self.m

    @property
    def label(self) -> str:
        return f"{self.n}:{self.m}"

    def violation(self, keep: torch.Tensor) -> str | None:
        cols = _cols(tuple(keep.shape))
        if cols % self.m:
            return f"width {cols} is not a multiple of {self.m}"
        per_group = keep.reshape(keep.shape[0], cols // self.m, self.m).sum(-1)  # (out, groups)
        worst = int(per_group.max()) if per_group.numel() else 0
        if worst > self.n:
            bad = int((per_group > self.n).sum())
            return f"{bad} group(s) of {self.m} keep more than {self.n} weights (up to {worst})"
        return None

    def check_shape(self, shape: tuple[int, ...], layer: str) -> None:
        cols = _cols(shape)
        if cols % self.m:
            raise ModelpressError(
                f"{layer}: {self.n}:{self.m} sparsity needs the input width to be a multiple of {self.m}, "
                f"got {cols} (weight shape {tuple(shape)})")


@PATTERNS.register("block")
class Block(SparsityPattern):
    """Weights kept or zeroed in whole ``rows x cols`` tiles."""

    type: Literal["block"] = "block"
    rows: int = Field(ge=1)
    cols: int = Field(ge=1)

    def __init__(self, rows: int | None = None, cols: int | None = None, /, **data: Any) -> None:
        """Allow ``Block(16, 16)`` as well as ``Block(rows=16, cols=16)``."""
        if rows is not None:
            data["rows"] = rows
        if cols is not None:
            data["cols"] = cols
        super().__init__(**data)

    @property
    def label(self) -> str:
        return f"{self.rows}x{self.cols}"

    def violation(self, keep: torch.Tensor) -> str | None:
        out, cols = keep.shape[0], _cols(tuple(keep.shape))
        if out % self.rows or cols % self.cols:
            return f"the {out}x{cols} weight is not tiled by {self.rows}x{self.cols} blocks"
        tiles = keep.reshape(out // self.rows, self.rows, cols // self.cols, self.cols).sum((1, 3))
        mixed = int(((tiles > 0) & (tiles < self.rows * self.cols)).sum())
        return f"{mixed} block(s) are partly kept" if mixed else None

    def check_shape(self, shape: tuple[int, ...], layer: str) -> None:
        out, cols = shape[0], _cols(shape)
        if out % self.rows or cols % self.cols:
            raise ModelpressError(
                f"{layer}: block {self.rows}x{self.cols} does not tile the {out}x{cols} weight "
                f"(rows must divide {out}, cols must divide {cols})")


@PATTERNS.register("structured")
class Structured(SparsityPattern):
    """Whole units removed so the matrices really shrink (see ``modelpress.sparsity.structured``)."""

    type: Literal["structured"] = "structured"
    kind: Literal["heads", "channels", "layers"]


def _cols(shape: tuple[int, ...]) -> int:
    """Input width of a weight viewed as 2-D (Conv2d: in * kh * kw)."""
    cols = 1
    for s in shape[1:]:
        cols *= s
    return cols


_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_BLOCK_RE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*$")


def _coerce(v: Any) -> Any:
    """YAML shorthand: ``unstructured``, ``"2:4"``, ``"16x16"``, ``heads|channels|layers``."""
    if not isinstance(v, str):
        return v
    if v in ("unstructured",):
        return {"type": v}
    if v in ("heads", "channels", "layers"):
        return {"type": "structured", "kind": v}
    if mt := _NM_RE.match(v):
        return {"type": "nm", "n": int(mt[1]), "m": int(mt[2])}
    if mt := _BLOCK_RE.match(v):
        return {"type": "block", "rows": int(mt[1]), "cols": int(mt[2])}
    raise ValueError(f"unknown sparsity pattern {v!r}; use unstructured, 'N:M', 'RxC' or a mapping with 'type'")


_tagged = tagged(PATTERNS, "type")

#: Pydantic field type for "any registered sparsity pattern" (accepts the YAML shorthand).
PatternField = Annotated[SerializeAsAny[SparsityPattern], BeforeValidator(lambda v: _tagged(_coerce(v)))]


def pattern_from_dict(data: Any) -> SparsityPattern:
    """Build a pattern from a mapping or the shorthand string (``"2:4"``, ``"unstructured"`` ...)."""
    try:
        return _tagged(_coerce(data))
    except ValueError as e:
        msg = str(e).removeprefix("@").removeprefix("<root>: ").replace("\x1f", "; ")
        raise ModelpressError(f"sparsity pattern: {msg}") from None


def check_sparsity(sparsity: float, layer: str) -> None:
    """A fraction of zeros must lie in [0, 1): refuse anything else, naming ``layer``."""
    if not (0.0 <= float(sparsity) < 1.0):
        raise ModelpressError(f"{layer}: sparsity must lie in [0, 1), got {sparsity}")
