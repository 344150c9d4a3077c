"""Recipes: an ordered list of typed stages, read from YAML (or built in Python).

Example YAML::

    name: rtn-w4-g64
    description: 4-bit symmetric RTN, groups of 64
    stages:
      - method: rtn
        ignore: [lm_head]
        format: {type: int, bits: 4, granularity: 64}

Validation errors name the YAML path of the bad field and what was expected.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BeforeValidator, Field, SerializeAsAny, ValidationError, field_validator

from ..core.config import Config, format_validation_error, tagged
from ..core.errors import ModelpressError
from ..core.method import METHODS, MethodConfig

StageField = Annotated[SerializeAsAny[MethodConfig], BeforeValidator(tagged(METHODS, "method", lambda e: e.config))]


class CalibrationSize(Config):
    """How much calibration text a recipe was measured with (its training stages' cost grows with it)."""

    samples: int | None = Field(None, ge=1, description="calibration windows")
    seq_len: int | None = Field(None, ge=1, description="tokens per window")


class Recipe(Config):
    """An ordered list of compression stages (at least one: an empty recipe would save an
    uncompressed copy as if compressed). ``calibration``: the window count and length the CLI uses
    when no ``--calib-samples`` / ``--calib-seq-len`` is given, so a built-in that trains on its
    calibration text (Block-AP) runs at the budget it was measured at, not 4x it."""

    name: str = "custom"
    description: str = ""
    calibration: CalibrationSize = CalibrationSize()
    stages: list[StageField]

    @field_validator("stages")
    @classmethod
    def _not_empty(cls, v: list) -> list:
        if not v:
            raise ValueError("a recipe needs at least one stage")
        return v

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def parse_recipe(data: Any, origin: str = "<recipe>") -> Recipe:
    """Validate a recipe dict; errors read ``origin: stages[0].format.bits: ...``."""
    if not isinstance(data, dict):
        raise ModelpressError(f"{origin}: a recipe must be a mapping with a 'stages' list")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise ModelpressError(f"{origin}: {format_validation_error(e)}") from None


def builtin_dir() -> Path:
    return Path(str(resources.files("modelpress.pipeline") / "builtin"))


def builtin_recipes() -> dict[str, Path]:
    """Built-in recipe name -> file."""
    return {p.stem: p for p in sorted(builtin_dir().glob("*.yaml"))}


def load_recipe(spec: str | Path | Recipe | dict) -> Recipe:
    """A recipe from a built-in name, a YAML path, a dict or a Recipe."""
    if isinstance(spec, Recipe):
        return spec
    if isinstance(spec, dict):
        return parse_recipe(spec)
    s = str(spec)
    builtins = builtin_recipes()
    path = builtins.get(s) or Path(s)
    if not path.is_file():
        raise ModelpressError(f"recipe {s!r} is neither a file nor a built-in; built-ins: {', '.join(builtins)}")
    from ..data.sources import read_text

    try:
        data = yaml.safe_load(read_text(path, join_lines=False))
    except yaml.YAMLError as e:
        raise ModelpressError(f"{path}: invalid YAML: {' '.join(str(e).split())}") from None
    return parse_recipe(data, str(path) if s not in builtins else s)
