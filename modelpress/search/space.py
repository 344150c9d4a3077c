"""A search space over recipe parameters, kept as data: named parameters and a recipe template.

A space file names each parameter's domain and writes the recipe once, with ``$name`` where a value
goes; a stage with ``when: name`` is kept only when that parameter is non-zero (so "sparsity 0"
means no pruning stage, not a pruning stage that prunes nothing):

.. code-block:: yaml

    name: quant-prune
    params:
      method: {choices: [rtn, gptq]}
      bits: {choices: [2, 3, 4, 8]}
      group: {choices: [32, 64, 128]}
      sparsity: {low: 0.0, high: 0.7, step: 0.1}
    stages:
      - {method: magnitude, when: sparsity, ignore: [lm_head], pattern: unstructured, sparsity: $sparsity}
      - {method: $method, ignore: [lm_head], format: {type: int, bits: $bits, granularity: $group}}

Every trial's parameters become an ordinary :class:`~modelpress.pipeline.recipe.Recipe`, validated
as any recipe file is. The space is checked when it is read: each corner of it (every combination
of the choices with the ends of each range) must give a valid recipe, so a bad combination fails
before the first trial, not in the middle of a study.

Example:
    >>> space = read_space("space.yaml")                        # doctest: +SKIP
    >>> space.recipe({"method": "rtn", "bits": 4, "group": 64, "sparsity": 0.0}).stages[0].method  # doctest: +SKIP
    'rtn'
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Union

import yaml

from ..core.errors import ModelpressError
from ..pipeline.recipe import Recipe, parse_recipe

Value = Union[int, float, str, bool]
#: Combinations of corners checked when a space is read, at most (the recipes are only parsed).
MAX_CORNERS = 4096


class Suggester(Protocol):
    """What a parameter asks of a trial (an ``optuna.Trial`` satisfies it)."""

    def suggest_categorical(self, name: str, choices: Any) -> Any: ...
    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False) -> float: ...
    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int: ...


@dataclass(frozen=True)
class Categorical:
    """One of a list of values (numbers, strings or booleans)."""

    choices: tuple[Value, ...]

    def suggest(self, trial: Suggester, name: str) -> Value:
        return trial.suggest_categorical(name, list(self.choices))

    def corners(self) -> tuple[Value, ...]:
        return self.choices

    def to_dict(self) -> dict[str, Any]:
        return {"choices": list(self.choices)}


@dataclass(frozen=True)
class FloatRange:
    """A float in [low, high], optionally on a grid of ``step`` or sampled in log space."""

    low: float
    high: float
    step: float | None = None
    log: bool = False

    def suggest(self, trial: Suggester, name: str) -> float:
        v = trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)
        return round(v, 12)  # a grid point, not 0.30000000000000004

    def corners(self) -> tuple[float, ...]:
        return (self.low, self.high)

    def to_dict(self) -> dict[str, Any]:
        return {"low": self.low, "high": self.high, "step": self.step, "log": self.log}


@dataclass(frozen=True)
class IntRange:
    """An integer in [low, high] (every ``step``-th)."""

    low: int
    high: int
    step: int = 1
    log: bool = False

    def suggest(self, trial: Suggester, name: str) -> int:
        return trial.suggest_int(name, self.low, self.high, step=self.step, log=self.log)

    def corners(self) -> tuple[int, ...]:
        return (self.low, self.high)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "int", "low": self.low, "high": self.high, "step": self.step, "log": self.log}


Param = Union[Categorical, FloatRange, IntRange]


@dataclass(frozen=True)
class SearchSpace:
    """Named parameter domains and the recipe template they fill (see the module docstring)."""

    name: str
    params: dict[str, Param]
    stages: tuple[dict[str, Any], ...]
    origin: str = "<space>"

    def suggest(self, trial: Suggester) -> dict[str, Value]:
        """One value per parameter, asked of ``trial`` in the space's order."""
        return {name: p.suggest(trial, name) for name, p in self.params.items()}

    def recipe(self, values: dict[str, Value]) -> Recipe:
        """The ordinary recipe these parameter values give (validated like a recipe file)."""
        missing = sorted(set(self.params) - set(values))
        if missing:
            raise ModelpressError(f"{self.origin}: no value for parameter(s) {', '.join(missing)}")
        stages = [_fill(_without_when(st), values) for st in self.stages if _kept(st, values)]
        tag = "-".join(f"{k}{_short(v)}" for k, v in values.items())
        return parse_recipe({"name": f"{self.name}-{tag}", "description": f"search space {self.name}: {values}",
                             "stages": stages}, f"{self.origin} with {values}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "params": {k: p.to_dict() for k, p in self.params.items()},
                "stages": [dict(s) for s in self.stages]}


def _kept(stage: dict[str, Any], values: dict[str, Value]) -> bool:
    cond = stage.get("when")
    return cond is None or bool(values[cond])


def _without_when(stage: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in stage.items() if k != "when"}


def _fill(node: Any, values: dict[str, Value]) -> Any:
    """Replace every ``$name`` string (a whole value, never part of one) by the parameter's value."""
    if isinstance(node, str) and node.startswith("$"):
        return values[node[1:]]
    if isinstance(node, dict):
        return {k: _fill(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill(v, values) for v in node]
    return node


def _short(v: Value) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _references(node: Any) -> set[str]:
    if isinstance(node, str) and node.startswith("$"):
        return {node[1:]}
    if isinstance(node, dict):
        return set().union(*(_references(v) for v in node.values())) if node else set()
    if isinstance(node, list):
        return set().union(*(_references(v) for v in node)) if node else set()
    return set()


def parse_param(name: str, spec: Any, origin: str) -> Param:
    """One parameter's domain: ``{choices: [...]}``, ``{low, high[, step, log]}`` (float, or int with
    ``type: int`` or integer bounds)."""
    where = f"{origin}: params.{name}"
    if not isinstance(spec, dict):
        raise ModelpressError(f"{where}: expected a mapping with 'choices' or 'low'/'high', got {spec!r}")
    if "choices" in spec:
        ch = spec["choices"]
        if not isinstance(ch, list) or not ch or len(set(map(repr, ch))) != len(ch):
            raise ModelpressError(f"{where}.choices: a non-empty list of distinct values, got {ch!r}")
        return Categorical(tuple(ch))
    unknown = set(spec) - {"low", "high", "step", "log", "type"}
    if unknown or "low" not in spec or "high" not in spec:
        raise ModelpressError(f"{where}: expected 'choices' or 'low' and 'high' (optional step, log, type), got {sorted(spec)}")
    low, high, step, log = spec["low"], spec["high"], spec.get("step"), bool(spec.get("log", False))
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in (low, high)) or low >= high:
        raise ModelpressError(f"{where}: low and high must be finite numbers with low < high, got {low!r}, {high!r}")
    if log and low <= 0:
        raise ModelpressError(f"{where}: a log range needs low > 0, got {low!r}")
    if spec.get("type") == "int" or (spec.get("type") is None and all(isinstance(x, int) for x in (low, high, step or 1))):
        return IntRange(int(low), int(high), int(step or 1), log)
    if step is not None and (not isinstance(step, (int, float)) or step <= 0 or log):
        raise ModelpressError(f"{where}.step: a positive number (and not with log), got {step!r}")
    return FloatRange(float(low), float(high), None if step is None else float(step), log)


def parse_space(data: Any, origin: str = "<space>") -> SearchSpace:
    """Validate a space dict (see the module docstring); errors name ``origin`` and the field."""
    if not isinstance(data, dict) or not isinstance(data.get("params"), dict) or not isinstance(data.get("stages"), list):
        raise ModelpressError(f"{origin}: a search space is a mapping with 'params' (a mapping) and 'stages' (a list)")
    unknown = set(data) - {"name", "description", "params", "stages"}
    if unknown:
        raise ModelpressError(f"{origin}: unknown key(s) {sorted(unknown)} (expected name, description, params, stages)")
    params = {str(k): parse_param(str(k), v, origin) for k, v in data["params"].items()}
    if not params:
        raise ModelpressError(f"{origin}: params is empty: there is nothing to search")
    stages = tuple(data["stages"])
    for i, st in enumerate(stages):
        if not isinstance(st, dict):
            raise ModelpressError(f"{origin}: stages[{i}] must be a mapping, got {st!r}")
        cond = st.get("when")
        if cond is not None and cond not in params:
            raise ModelpressError(f"{origin}: stages[{i}].when names {cond!r}, which is not a parameter")
        undefined = sorted(_references(st) - set(params))
        if undefined:
            raise ModelpressError(f"{origin}: stages[{i}] uses ${undefined[0]}, which is not a parameter")
    used = set().union(*(_references(st) | {st.get("when")} for st in stages)) if stages else set()
    unused = sorted(set(params) - used)
    if unused:
        raise ModelpressError(f"{origin}: parameter(s) {', '.join(unused)} appear in no stage")
    space = SearchSpace(str(data.get("name", Path(origin).stem)), params, stages, origin)
    check_corners(space)
    return space


def check_corners(space: SearchSpace) -> None:
    """Build the recipe of every corner of the space (each choice, each range end), so a value no
    method accepts is refused now; very large spaces check the first :data:`MAX_CORNERS`."""
    names = list(space.params)
    for combo in itertools.islice(itertools.product(*(space.params[n].corners() for n in names)), MAX_CORNERS):
        space.recipe(dict(zip(names, combo)))


def read_space(path: str | Path) -> SearchSpace:
    """Read and check a space YAML file."""
    p = Path(path)
    if not p.is_file():
        raise ModelpressError(f"search space {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ModelpressError(f"{p}: not a readable YAML file ({type(e).__name__}: {e})") from None
    return parse_space(data, str(p))
