"""Save/load round trip is bit-exact and writes are atomic."""
import pytest
import torch

import modelpress as mp
from modelpress.core.errors import ModelpressError
from modelpress.export.saving import load_compressed, save_compressed
from modelpress.quant.qlinear import QuantLinear
from tests.conftest import make_tiny_llama


@pytest.mark.parametrize("recipe", ["rtn-w8", "rtn-w4-g32", "rtn-w3-g64"])
def test_round_trip_bit_exact(recipe, tmp_path):
    lm = mp.load(make_tiny_llama(seed=3))
    mp.compress(lm, recipe, progress=False)
    ids = torch.randint(0, 300, (1, 40))
    before = lm.module(input_ids=ids).logits
    out = save_compressed(lm, tmp_path / "m", recipe=mp.as_recipe(recipe))
    back = load_compressed(out)
    for name, m in lm.module.named_modules():
        if isinstance(m, QuantLinear):
            m2 = back.module.get_submodule(name)
            assert isinstance(m2, QuantLinear)
            for k in m._tensor_names:
                assert torch.equal(getattr(m, k), getattr(m2, k)), (name, k)
    assert torch.equal(before, back.module(input_ids=ids).logits)


def test_overwrite_keeps_old_until_complete(tmp_path):
    lm = mp.load(make_tiny_llama(seed=4))
    out = save_compressed(lm, tmp_path / "m")
    with pytest.raises(ModelpressError, match="exists"):
        save_compressed(lm, out)
    save_compressed(lm, out, overwrite=True)
    assert (out / "modelpress.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
