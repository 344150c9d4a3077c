"""Invariant 6: a bad config is refused when the recipe is loaded, with one ModelpressError line that
names the field (``stages[0].<field>`` or ``stages[0].format.<field>``).

Bad values are derived from each config field's type and constraints, for every registered method
and every registered format (so a new one gets its rows by registering):

* type: a string for a number or a bool, a number for a list, an unknown option for a ``Literal``,
  an unknown ``type`` tag for a nested format / pattern;
* range: the bound itself for ``gt`` / ``lt``, one past it for ``ge`` / ``le`` (pydantic metadata);
* an unknown key.

Also: every (method, format or pattern) pair a method refuses at load names both.
"""
from __future__ import annotations

import types
import typing
from typing import Any

import annotated_types as at
import pytest
from pydantic import BaseModel

from modelpress.core.errors import ModelpressError
from modelpress.core.method import METHODS
from modelpress.pipeline.recipe import parse_recipe
from modelpress.quant.formats.base import FORMATS

from .cells import refused_variants
from .rows import _base_stage, all_format_variants


def _strip_optional(ann: Any) -> Any:
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        return args[0] if len(args) == 1 else ann
    return ann


def _type_bad(ann: Any) -> Any:
    ann = _strip_optional(ann)
    if ann is bool:
        return "maybe"
    if ann in (int, float):
        return "not-a-number"
    if typing.get_origin(ann) is typing.Literal:
        return "no-such-option"
    if typing.get_origin(ann) in (list, tuple):
        return 5
    if typing.get_origin(ann) is dict:
        return "not-a-mapping"
    if typing.get_origin(ann) is typing.Annotated or typing.get_origin(ann) in (typing.Union, types.UnionType):
        return "no-such-kind"  # granularity: tensor / channel / a group size
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return {"type": "no-such-kind"}
    return None


def _range_bad(ann: Any, metadata: list[Any]) -> list[tuple[str, Any]]:
    ann = _strip_optional(ann)
    step = 1 if ann is int else 0.5
    out = []
    for m in metadata:
        if isinstance(m, at.Gt):
            out.append((f"gt{m.gt}", m.gt))
        elif isinstance(m, at.Ge):
            out.append((f"ge{m.ge}", m.ge - step))
        elif isinstance(m, at.Lt):
            out.append((f"lt{m.lt}", m.lt))
        elif isinstance(m, at.Le):
            out.append((f"le{m.le}", m.le + step))
    return out


def _field_cases(cls: type, skip: tuple[str, ...]) -> list[tuple[str, str, Any]]:
    """(field, case id, bad value) for every field of a config class."""
    cases = []
    for name, info in cls.model_fields.items():
        if name in skip:
            continue
        bad = _type_bad(info.annotation)
        if bad is not None:
            cases.append((name, "type", bad))
        cases.extend((name, rid, v) for rid, v in _range_bad(info.annotation, info.metadata))
    cases.append(("no_such_field", "unknown", 1))
    return cases


def _method_rows() -> list[tuple[str, str, str, Any]]:
    return [(m, f, c, v) for m, e in METHODS.items() for f, c, v in _field_cases(e.config, ("method",))]


def _format_rows() -> list[tuple[str, str, str, str, Any]]:
    """Each format's bad fields, inside a stage of every method that has a ``format`` field."""
    hosts = [m for m, e in METHODS.items() if "format" in e.config.model_fields]
    rows = []
    for tag, cls in FORMATS.items():
        for f, c, v in _field_cases(cls, ("type",)):
            rows.extend((m, tag, f, c, v) for m in hosts)
    return rows


def _refused(stage: dict[str, Any]) -> str:
    with pytest.raises(ModelpressError) as ei:
        parse_recipe({"name": "bad", "stages": [stage]})
    msg = str(ei.value)
    assert "\n" not in msg.strip() and "Traceback" not in msg, f"refusal is not one line: {msg!r}"
    return msg


METHOD_ROWS = _method_rows()


@pytest.mark.parametrize("method,field,case,value", METHOD_ROWS,
                         ids=[f"{m}-{f}-{c}" for m, f, c, _ in METHOD_ROWS])
def test_bad_method_field_is_refused_naming_it(method: str, field: str, case: str, value: Any) -> None:
    stage = {**_base_stage(method, METHODS.get(method).config), field: value}
    try:
        msg = _refused(stage)
    except pytest.fail.Exception:
        raise
    except BaseException as e:
        if isinstance(e, AssertionError):
            raise
        pytest.fail(f"{method}.{field}={value!r} ({case}): parse_recipe raised {type(e).__name__}: {e}")
    assert f"stages[0].{field}" in msg, f"{method}.{field}={value!r} ({case}) refused without naming the field: {msg}"


FORMAT_ROWS = _format_rows()


@pytest.mark.parametrize("method,fmt,field,case,value", FORMAT_ROWS,
                         ids=[f"{m}-{t}-{f}-{c}" for m, t, f, c, _ in FORMAT_ROWS])
def test_bad_format_field_is_refused_naming_it(method: str, fmt: str, field: str, case: str, value: Any) -> None:
    base_fmt = all_format_variants()[fmt][0][0]
    stage = {**_base_stage(method, METHODS.get(method).config), "format": {**base_fmt, field: value}}
    msg = _refused(stage)
    assert f"stages[0].format.{field}" in msg, (f"{method} with {fmt}.{field}={value!r} ({case}) refused without "
                                                f"naming the field: {msg}")


def test_unknown_method_is_refused_naming_it() -> None:
    msg = _refused({"method": "no-such-method"})
    assert "stages[0]" in msg and "method" in msg and "no-such-method" in msg, msg


@pytest.mark.parametrize("method", [m for m, _ in METHODS.items()])
def test_every_method_has_rows(method: str) -> None:
    """A registered method's defaults (plus FIELD_VALUES) validate, so the matrix can run it."""
    stage = _base_stage(method, METHODS.get(method).config)
    try:
        parse_recipe({"name": "defaults", "stages": [stage]})
    except ModelpressError as e:
        pytest.fail(f"{method} has no runnable row: {e} (give its required fields a value in rows.FIELD_VALUES)")


REFUSED = [(v, m) for v, m in refused_variants() if v.group != "defaults"]


@pytest.mark.parametrize("variant,msg", REFUSED, ids=[f"{v.method}-{v.vid}" for v, _ in REFUSED])
def test_refused_pair_names_method_and_format(variant, msg: str) -> None:
    """A method that refuses a format (or pattern) at load says which method and which format."""
    assert variant.method in msg, f"refusal of {variant.method} x {variant.vid} does not name the method: {msg}"
    assert variant.group in msg, f"refusal of {variant.method} x {variant.vid} does not name {variant.group!r}: {msg}"
    assert "\n" not in msg.strip(), f"refusal is not one line: {msg!r}"
