"""Rows of the conformance matrix, generated from the registries (nothing here names a method).

* methods: ``METHODS.items()``; a stage is ``{"method": name}`` plus :data:`FIELD_VALUES` for the
  fields the method's config has (required knobs such as ``keep``, and knobs that only make a tiny
  run cheaper such as ``grid``). Each method gets its *defaults* variant, then
  - one variant per sparsity pattern (:data:`PATTERNS`) when its config has a ``pattern`` field,
    plus the first pattern with ``storage: dense`` when it has a ``storage`` field;
  - one variant per format variant (:func:`format_variants`) when it has a ``format`` field.
* formats: ``FORMATS.items()``; per format class the product of the *primary* axes (``bits`` in
  8/4/3 and ``granularity`` per channel / groups of 16, where the class has them), then, one at a
  time on the base config, per-tensor granularity and the first non-default value of each bool or
  ``Literal`` field. Configs the format's own validators refuse are dropped, duplicates (same
  ``to_dict()``) removed. A new format class gets variants from its fields, without an entry here.

A variant belongs to a *group*: ``defaults``, its format type, its pattern type or ``dense``
storage. The group's first variant is its *representative*.
"""
from __future__ import annotations

import itertools
import json
import typing
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from modelpress.core.errors import ModelpressError
from modelpress.core.method import METHODS, StageKind
from modelpress.pipeline.recipe import parse_recipe
from modelpress.quant.formats.base import FORMATS

#: Values for config fields, applied when a method's config has the field. Required fields first
#: (a new method with a required field not listed here fails its rows with pydantic's "field
#: required" refusal: add the field here), then knobs that keep a 2-block, 32-wide model cheap
#: without changing what the method does.
FIELD_VALUES: dict[str, Any] = {
    "keep": 2,                 # experts kept (tiny MoE models have 4)
    "heads_fraction": 0.25,    # structured: something to remove
    "mlp_fraction": 0.25,
    "grid": 4,                 # AWQ scale grid (default 20)
    "clip_grid": 4,
    "epochs": 1,               # DejaVu predictor training
    "rank": 8,
    "similarity_tokens": 64,
    "train": {"steps": 2, "batch_size": 2},  # training stages (distill): two optimiser steps
    "same_bytes_as_bits": 3,   # mixed-precision: the budget (no default: the user names it)
}

#: Field values that are required by some formats (``int`` has no default bit width).
FORMAT_REQUIRED: dict[str, Any] = {"bits": 4}
PRIMARY_AXES: dict[str, list[Any]] = {"bits": [8, 4, 3], "granularity": ["channel", 16]}
SECONDARY_VALUES: dict[str, list[Any]] = {"granularity": ["tensor"]}

#: Sparsity patterns for methods with a ``pattern`` field: (group, pattern, extra fields).
PATTERNS: list[tuple[str, Any, dict[str, Any]]] = [
    ("unstructured", "unstructured", {"sparsity": 0.5}),
    ("nm", "2:4", {}),
    ("nm", "4:8", {}),
    ("block", "8x8", {"sparsity": 0.5}),
]


@dataclass(frozen=True)
class Variant:
    """One stage of one method: ``stage`` is the recipe stage dict, ``group`` its sampling group."""

    method: str
    vid: str
    stage: dict[str, Any]
    group: str
    representative: bool
    axis: str  # "format", "pattern", "storage" or "default": what this variant varies
    primary: bool = True  # False for the one-at-a-time (secondary) format variants

    @property
    def fmt(self) -> dict[str, Any] | None:
        return self.stage.get("format")

    def key(self) -> str:
        return json.dumps(self.stage, sort_keys=True)


# ---- formats --------------------------------------------------------------------------------------
def _finite_values(annotation: Any) -> list[Any] | None:
    """All values of a bool / Literal field, else None."""
    if annotation is bool:
        return [False, True]
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    return None


def _valid_format(cls: type, data: dict[str, Any]) -> dict[str, Any] | None:
    try:
        return cls.model_validate(data).to_dict()
    except (ValidationError, ValueError, ModelpressError):
        return None


def format_variants(tag: str, cls: type) -> list[tuple[dict[str, Any], bool]]:
    """(config, primary) for the representative configs of one format class (see module docstring);
    the first is the base, ``primary`` is False for the one-at-a-time secondary variants."""
    fields = cls.model_fields
    base = {"type": tag, **{k: v for k, v in FORMAT_REQUIRED.items() if k in fields}}
    out: list[tuple[dict[str, Any], bool]] = []

    def add(data: dict[str, Any], primary: bool) -> None:
        d = _valid_format(cls, data)
        if d is not None and all(d != o for o, _ in out):
            out.append((d, primary))

    add(base, True)
    axes = {k: v for k, v in PRIMARY_AXES.items() if k in fields}
    for combo in itertools.product(*axes.values()):
        add({**base, **dict(zip(axes, combo))}, True)
    for name, info in fields.items():
        if name == "type":
            continue
        others = [v for v in _finite_values(info.annotation) or [] if v != info.default]
        for v in list(SECONDARY_VALUES.get(name, [])) + others[:1]:
            add({**base, name: v}, False)
    return out


def all_format_variants() -> dict[str, list[tuple[dict[str, Any], bool]]]:
    """Format type -> its (config, primary) variants, for every registered format."""
    return {tag: format_variants(tag, cls) for tag, cls in FORMATS.items()}


def format_id(fmt: dict[str, Any]) -> str:
    """Short readable id: type, bits, granularity, then the fields that differ from the class's
    defaults (``int4-g16-symmetric=False``, ``nf4-g64``, ``fp8-ch-variant=e5m2``)."""
    defaults = FORMATS.get(fmt["type"]).model_fields
    parts = [fmt["type"] + (str(fmt["bits"]) if "bits" in fmt else "")]
    g = fmt.get("granularity") or {}
    parts.append({"group": f"g{g.get('size')}", "channel": "ch", "tensor": "tensor"}.get(g.get("kind"), ""))
    for k, v in sorted(fmt.items()):
        if k in ("type", "bits", "granularity") or (k in defaults and defaults[k].default == v):
            continue
        parts.append(f"{k}={v}")
    return "-".join(p for p in parts if p)


# ---- methods --------------------------------------------------------------------------------------
def _base_stage(name: str, cfg_cls: type) -> dict[str, Any]:
    fields = cfg_cls.model_fields
    return {"method": name, **{k: v for k, v in FIELD_VALUES.items() if k in fields}}


def method_variants(name: str, entry: Any) -> list[Variant]:
    """Every stage variant of one registered method: first its defaults, then one per pattern and
    per format (representatives first within each group)."""
    fields = entry.config.model_fields
    base = _base_stage(name, entry.config)
    out = [Variant(name, "defaults", dict(base), "defaults", True, "default")]
    seen_groups: set[str] = {"defaults"}

    def add(vid: str, stage: dict[str, Any], group: str, axis: str, primary: bool = True) -> None:
        out.append(Variant(name, vid, stage, group, group not in seen_groups, axis, primary))
        seen_groups.add(group)

    if "pattern" in fields:
        for group, pattern, extra in PATTERNS:
            add(f"{pattern}", {**base, "pattern": pattern, **{k: v for k, v in extra.items() if k in fields}},
                group, "pattern")
        if "storage" in fields:
            group, pattern, extra = PATTERNS[0]
            add(f"{pattern}-dense", {**base, "pattern": pattern, "storage": "dense",
                                     **{k: v for k, v in extra.items() if k in fields}}, "dense", "storage")
    if "format" in fields:
        for tag, variants in all_format_variants().items():
            for fmt, primary in variants:
                add(format_id(fmt), {**base, "format": fmt}, tag, "format", primary)
    return out


def all_variants() -> list[Variant]:
    return [v for name, entry in METHODS.items() for v in method_variants(name, entry)]


def validates(stage: dict[str, Any]) -> str | None:
    """None when the stage is accepted at recipe load, else the refusal message."""
    try:
        parse_recipe({"name": "conformance", "stages": [stage]})
    except ModelpressError as e:
        return str(e)
    return None


def is_calibrated(method: str) -> bool:
    return bool(METHODS.get(method).needs_calibration)


def is_blockwise(method: str) -> bool:
    e = METHODS.get(method)
    return e.kind in (StageKind.BLOCKWISE, StageKind.RECONSTRUCTION)
