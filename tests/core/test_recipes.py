import pytest

from modelpress.core.errors import ModelpressError
from modelpress.pipeline.recipe import Recipe, builtin_recipes, load_recipe, parse_recipe

REQUIRED = {"rtn-w8", "rtn-w4-g128", "rtn-w3-g128", "rtn-w4-g64", "rtn-w3-g64"}


def test_builtins_exist_and_validate():
    names = set(builtin_recipes())
    assert REQUIRED <= names
    for n in names:
        r = load_recipe(n)
        assert r.name == n and r.stages


def test_builtin_formats_are_typed():
    from modelpress.quant.granularity import PerChannel, PerGroup

    st = load_recipe("rtn-w4-g128").stages[0]
    assert st.format.bits == 4 and st.format.granularity == PerGroup(size=128)
    assert load_recipe("rtn-w8").stages[0].format.granularity == PerChannel()


def test_round_trip_through_dict():
    r = load_recipe("rtn-w3-g64")
    again = parse_recipe(r.to_dict())
    assert again == r and isinstance(again, Recipe)


@pytest.mark.parametrize("stage, expected", [
    ({"method": "rtn", "format": {"type": "int", "bits": 9}}, r"stages\[0\]\.format\.bits: .*2\.\.8 bits, got 9$"),
    ({"method": "rtn", "format": {"type": "int", "bits": "four"}}, r"stages\[0\]\.format\.bits: .*integer"),
    ({"method": "rtn", "formt": {"type": "int", "bits": 4}}, r"stages\[0\]\.formt: unknown key"),
    ({"method": "rtn", "format": {"type": "int8"}}, r"stages\[0\]\.format: unknown format 'int8'; registered: .*int"),
    ({"method": "gptqq"}, r"stages\[0\]: unknown method 'gptqq'; registered: .*rtn"),
    ({"method": "rtn", "format": {"type": "int", "bits": 4, "granularity": 0}}, r"stages\[0\]\.format\.granularity.*size"),
])
def test_validation_messages_point_at_the_field(stage, expected):
    with pytest.raises(ModelpressError, match=expected):
        parse_recipe({"stages": [stage]}, "my.yaml")


def test_yaml_file_errors(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("stages:\n  - method: rtn\n    format: {type: int, bits: 1}\n")
    with pytest.raises(ModelpressError, match=r"r\.yaml: stages\[0\]\.format\.bits"):
        load_recipe(str(p))
    with pytest.raises(ModelpressError, match="neither a file nor a built-in; built-ins: .*rtn-w8"):
        load_recipe("no-such-recipe")
    p.write_text("stages: [\n")
    with pytest.raises(ModelpressError, match="invalid YAML"):
        load_recipe(str(p))
