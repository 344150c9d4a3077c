import pytest
import torch.nn as nn

from modelpress.core.errors import ModelpressError
from modelpress.core.selectors import select
from modelpress.models.archspec import detect_spec, role_of
from modelpress.models.layers import named_linears
from tests.conftest import make_tiny_llama


def _cands():
    m = make_tiny_llama()
    return m, named_linears(m), detect_spec(m)


def test_role_glob_regex_and_name():
    m, c, spec = _cands()
    role = lambda n: role_of(n, m, spec)  # noqa: E731
    downs = select(c, ["role:down_proj"], [], role)
    assert [n for n, _ in downs] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert len(select(c, ["re:.*self_attn\\..*"], [], role)) == 8
    assert len(select(c, ["model.layers.*.mlp.*"], ["role:gate_proj"], role)) == 4
    assert [n for n, _ in select(c, ["lm_head"], [], role)] == ["lm_head"]
    everything = select(c, ["re:.*"], ["lm_head"], role)
    assert len(everything) == 14 and all(not n.endswith("lm_head") for n, _ in everything)


def test_no_match_names_selector_and_near_misses():
    m, c, spec = _cands()
    with pytest.raises(ModelpressError, match=r"'down_prj' matches no layer; near misses: .*down_proj"):
        select(c, ["down_prj"], [], lambda n: role_of(n, m, spec))
    with pytest.raises(ModelpressError, match="roles in this model: .*gate_proj"):
        select(c, ["role:mlp_in"], [], lambda n: role_of(n, m, spec))


def test_unknown_architecture_still_finds_linears():
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert detect_spec(m) is None
    assert [n for n, _ in named_linears(m)] == ["0", "2"]
