"""H. Recipes fuzzed from the built-in ones: a mutated recipe is a Recipe or a ModelpressError,
never another exception; through the CLI, exit 0 or a one-line exit 2.

Mutations: a leaf replaced by a JSON value of another type, a number replaced by an edge value
(0, 1, -1, 0.5 ...: a recipe that still validates but asks for odd things), a key deleted, an unknown
key added, the method swapped, a value nested wrongly (wrapped in a list / mapping, a mapping turned
into a list), the whole document replaced. Deterministic (``derandomize``), no example database.
"""
from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from modelpress.core.errors import ModelpressError

from .support import assert_nothing_half_written, assert_ok_or_user_error, calib_args

KEYS = ["method", "format", "type", "bits", "granularity", "symmetric", "targets", "ignore", "stages", "pattern",
        "sparsity", "n", "m", "name", "bogus", "act_order", "scope", "layer_sparsity", "alpha", "grid"]
EDGE_NUMBERS = [0, 1, -1, 2, 3, 7, 8, 9, 0.0, 0.5, 1.0, 1.5, -0.5, 1e-9]
WORDS = ["", "re:(", "re:.*", "role:", "role:down_proj", "lm_head", "int", "nf4", "fp8", "channel", "tensor",
         "2:4", "16x16", "unstructured", "gptq", "rtn", "nope", "*", "\u00e9t\u00e9", "-1", "1e9"]


@functools.lru_cache(maxsize=1)
def builtin_docs() -> dict[str, Any]:
    from modelpress.pipeline.recipe import builtin_recipes

    return {name: yaml.safe_load(path.read_text()) for name, path in builtin_recipes().items()}


@functools.lru_cache(maxsize=1)
def method_names() -> list[str]:
    from modelpress.core.method import METHODS

    return METHODS.names()


def json_values(small: bool) -> st.SearchStrategy:
    """JSON values; ``small`` keeps numbers in ranges a tiny model runs quickly with."""
    ints = st.integers(-3, 9) if small else st.one_of(st.integers(-3, 300), st.integers(-(2**70), 2**70))
    floats = st.floats(-2, 2, allow_nan=False) if small else st.floats(allow_nan=False, allow_infinity=False)
    leaves = st.one_of(st.none(), st.booleans(), ints, floats, st.sampled_from(WORDS),
                       st.text(alphabet="abcxyz:_-.*0123456789 ", max_size=8))
    return st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.sampled_from(KEYS), inner, max_size=3)),
                        max_leaves=6)


def _nodes(doc: Any, path: tuple = ()) -> list[tuple]:
    """Paths of every node below the root (a path is a tuple of keys / indices)."""
    out = []
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        out.append(path + (k,))
        out.extend(_nodes(v, path + (k,)))
    return out


def _get(doc: Any, path: tuple) -> Any:
    for k in path:
        doc = doc[k]
    return doc


def _set(doc: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    _get(doc, path[:-1])[path[-1]] = value
    return doc


def _type_of(v: Any) -> str:
    return "number" if isinstance(v, (int, float)) and not isinstance(v, bool) else type(v).__name__


@st.composite
def mutated_recipes(draw: st.DrawFn, small: bool) -> tuple[str, Any]:
    name = draw(st.sampled_from(sorted(builtin_docs())))
    doc = copy.deepcopy(builtin_docs()[name])
    values = json_values(small)
    for _ in range(draw(st.integers(1, 3))):
        nodes = _nodes(doc)
        op = draw(st.sampled_from(["leaf", "edge", "delete", "add", "method", "nest", "root"] if nodes else ["root"]))
        if op == "root":
            doc = draw(st.one_of(values, st.just({"name": name}), st.just({"stages": None})))
            continue
        path = draw(st.sampled_from(nodes))
        if op == "leaf":
            leaves = [p for p in nodes if not isinstance(_get(doc, p), (dict, list))] or nodes
            path = draw(st.sampled_from(leaves))
            old = _get(doc, path)
            doc = _set(doc, path, draw(values.filter(lambda v, t=_type_of(old): _type_of(v) != t)))
        elif op == "edge":
            numbers = [p for p in nodes if _type_of(_get(doc, p)) == "number"]
            if numbers:
                doc = _set(doc, draw(st.sampled_from(numbers)), draw(st.sampled_from(EDGE_NUMBERS)))
        elif op == "delete":
            dicts = [p for p in [()] + nodes if isinstance(_get(doc, p), dict) and _get(doc, p)]
            if dicts:
                d = _get(doc, draw(st.sampled_from(dicts)))
                del d[draw(st.sampled_from(sorted(d, key=str)))]
        elif op == "add":
            dicts = [p for p in [()] + nodes if isinstance(_get(doc, p), dict)]
            if dicts:
                _get(doc, draw(st.sampled_from(dicts)))[draw(st.sampled_from(KEYS))] = draw(values)
        elif op == "method":
            stages = [p for p in nodes if p and p[-1] == "method"]
            if stages:
                doc = _set(doc, draw(st.sampled_from(stages)),
                           draw(st.one_of(st.sampled_from(method_names()), values)))
        elif op == "nest":
            old = _get(doc, path)
            how = draw(st.sampled_from(["list", "dict", "values"]))
            new = [old] if how == "list" else {"value": old} if how == "dict" else \
                list(old.values()) if isinstance(old, dict) else [old, old]
            doc = _set(doc, path, new)
    return name, doc


def _search(request: pytest.FixtureRequest, search) -> None:
    """Run a hypothesis search without its failing-example patch file.

    On failure, hypothesis' pytest plugin writes ``.hypothesis/patches/*.patch`` under the current
    folder (outside this test folder); the note it leaves on the test item for that is dropped.
    """
    try:
        search()
    finally:
        vars(request.node).pop("_hypothesis_failing_examples", None)


def test_parse_recipe_raises_only_modelpress_errors(request):
    from modelpress.pipeline.recipe import Recipe, parse_recipe

    @settings(max_examples=400, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(mutated_recipes(small=False))
    def search(case):
        _name, doc = case
        try:
            recipe = parse_recipe(doc)
        except ModelpressError:
            return
        assert isinstance(recipe, Recipe)

    _search(request, search)


@pytest.fixture(scope="module")
def fuzz_dirs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("recipe_fuzz")


def test_mutated_recipe_through_the_cli(request, cli, model_dir, text_file, fuzz_dirs):
    @settings(max_examples=12, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate],  # no shrinking: an example costs a compress
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(mutated_recipes(small=True))
    def search(case):
        _name, doc = case
        d = fuzz_dirs / f"ex{len(list(fuzz_dirs.iterdir())):04d}"
        d.mkdir()
        rec = d / "recipe.yaml"
        rec.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
        out = d / "out"
        res = cli("compress", "--model", model_dir, "--recipe", rec, *calib_args(text_file), "--output", out)
        assert_ok_or_user_error(res, after=lambda: assert_nothing_half_written(out, ["recipe.yaml"]))

    _search(request, search)
