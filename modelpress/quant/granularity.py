"""Granularity of quantisation parameters, as types rather than strings.

In YAML a granularity may be written ``tensor``, ``channel`` or an integer group size
(``128``), or explicitly ``{kind: group, size: 128}``.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BeforeValidator, Field

from ..core.config import Config


class PerTensor(Config):
    """One scale for the whole weight."""

    kind: Literal["tensor"] = "tensor"


class PerChannel(Config):
    """One scale per output channel (row of a Linear weight)."""

    kind: Literal["channel"] = "channel"


class PerGroup(Config):
    """One scale per ``size`` consecutive input columns of each row.

    A last group shorter than ``size`` (input width not a multiple of ``size``) is allowed and
    reported; see :func:`group_layout`.
    """

    kind: Literal["group"] = "group"
    size: int = Field(gt=0)

    def __init__(self, size: int | None = None, /, **data: Any) -> None:
        """Allow ``PerGroup(128)`` as well as ``PerGroup(size=128)``."""
        if size is not None:
            data["size"] = size
        super().__init__(**data)


def _coerce(v: Any) -> Any:
    if isinstance(v, bool):
        return v
    if isinstance(v, int):
        return {"kind": "group", "size": v}
    if isinstance(v, str) and v in ("tensor", "channel"):
        return {"kind": v}
    return v


Granularity = Annotated[
    Union[PerTensor, PerChannel, PerGroup], Field(discriminator="kind"), BeforeValidator(_coerce)
]


def group_size_for(gran: "PerTensor | PerChannel | PerGroup", in_features: int, out_features: int) -> int:
    """Columns per group for a weight of shape (out, in); per-tensor is handled by the caller."""
    if isinstance(gran, PerGroup):
        return gran.size
    return in_features


def group_layout(in_features: int, size: int) -> tuple[int, int]:
    """(number of groups, width of the last group) for ``in_features`` columns in groups of ``size``."""
    n = -(-in_features // size)
    return n, in_features - (n - 1) * size


def fitting_group_sizes(in_features: int, candidates: tuple[int, ...] = (16, 32, 64, 128, 256)) -> list[int]:
    """Group sizes from ``candidates`` that divide ``in_features`` (for error messages)."""
    return [c for c in candidates if in_features % c == 0]
