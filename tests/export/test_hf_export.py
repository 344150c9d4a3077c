"""hf export: a dense folder that plain transformers loads; layers it cannot hold are refused by default."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import modelpress as mp
from modelpress.core.errors import ModelpressError
from modelpress.export.export import export
from tests.conftest import make_tiny_llama


def test_activation_quantised_layers_refused_then_written_as_weights(tmp_path):
    """W8A8 quantises each layer's input at run time: no dense folder computes that. The default
    refuses in one line naming a layer; ``dequantize`` writes the int8 weights dequantised, with a note."""
    lm = mp.load(make_tiny_llama(seed=3))
    mp.compress(lm, "int8-dynamic", progress=False)
    with pytest.raises(ModelpressError, match=r"hf: 14 layer\(s\) quantise or sparsify their activations.*q_proj"):
        export(lm, "hf", tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    rep = export(lm, "hf", tmp_path / "hf", on_unsupported="dequantize")
    assert any("without the run-time activation step" in n for n in rep.notes)
    dense = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    q = lm.module.model.layers[0].self_attn.q_proj
    assert torch.equal(dense.model.layers[0].self_attn.q_proj.weight, q.dequantized_weight())


def test_weight_only_layers_export_without_a_policy(tmp_path):
    lm = mp.load(make_tiny_llama(seed=3))
    mp.compress(lm, "rtn-w8", progress=False)
    rep = export(lm, "hf", tmp_path / "hf")
    assert not rep.notes and (tmp_path / "hf" / "model.safetensors").exists()
