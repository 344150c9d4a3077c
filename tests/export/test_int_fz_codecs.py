"""Exports of float-zero (HQQ) layers, read back by the real libraries: compressed-tensors' own
decompressor and transformers (bit-exact), gguf-py's reader and dequantiser (Q4_1, within the bound the
export reports); one-line refusals where a target cannot hold them; the codec registries find the module."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import modelpress as mp
from modelpress.core.errors import ModelpressError
from modelpress.export.codecs.gguf_blocks import codec
from modelpress.export.export import export
from modelpress.quant.algos.hqq.method import HQQConfig, hqq_quantize
from modelpress.quant.qlinear import QuantLinear
from tests.conftest import make_tiny_llama, make_tokenizer

ct = pytest.importorskip("compressed_tensors")
gguf = pytest.importorskip("gguf")


def _hqq(fmt: dict, seed: int = 3, **kw) -> mp.LoadedModel:
    lm = mp.load(make_tiny_llama(seed=seed, **kw))
    mp.apply(lm, HQQConfig(format=fmt, ignore=["lm_head"]))
    return lm


def test_codec_registries_find_the_module_without_importing_it():
    code = ("from modelpress.export.codecs.compressed_tensors import CT_CODECS\n"
            "from modelpress.export.codecs.gguf_blocks import GGUF_CARRY\n"
            "print('int_fz' in CT_CODECS, 'Q4_1:int_fz' in GGUF_CARRY)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True"]


# ---- compressed-tensors: naive-quantized with a float32 zero point -----------------------------------
CT_FORMATS = [{"type": "int_fz", "bits": 4, "granularity": 32}, {"type": "int_fz", "bits": 3, "granularity": "channel"},
              {"type": "int_fz", "bits": 8, "granularity": 64}, {"type": "int_fz", "bits": 2, "granularity": "tensor"}]


@pytest.mark.parametrize("fmt", CT_FORMATS, ids=lambda f: json.dumps(f))
def test_compressed_tensors_decompresses_hqq_layers_bit_exactly(fmt, tmp_path):
    from tests.export.test_ct_export import _library_decompress

    lm = _hqq(fmt)
    rep = export(lm, "compressed-tensors", tmp_path / "ct")
    assert rep.counts() == {"lossless": 14}
    config, raw, weights = _library_decompress(tmp_path / "ct")
    assert config.model_dump(exclude=["quant_method"]).items() <= raw.items()  # the library's canonical form
    group = next(iter(raw["config_groups"].values()))
    assert group["format"] == "naive-quantized" and group["weights"]["zp_dtype"] == "torch.float32"
    assert len(weights) == 14
    for name, w in weights.items():
        assert torch.equal(w, lm.module.get_submodule(name).dequantized_weight()), name


def test_transformers_loads_the_hqq_ct_export_with_identical_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    lm = _hqq({"type": "int_fz", "bits": 4, "granularity": 32}, seed=4)
    export(lm, "compressed-tensors", tmp_path / "ct")
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"), dtype=torch.float32)
    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ref(input_ids=ids).logits, lm.module(input_ids=ids).logits)


def test_compressed_tensors_refuses_short_groups_in_one_line(tmp_path):
    lm = _hqq({"type": "int_fz", "bits": 4, "granularity": 48})  # widths 64 and 128
    with pytest.raises(ModelpressError) as ei:
        export(lm, "compressed-tensors", tmp_path / "ct")
    msg = str(ei.value)
    assert "\n" not in msg and "model.layers.0.self_attn.q_proj: group size 48 does not divide 64" in msg
    assert not (tmp_path / "ct").exists()


# ---- GGUF: Q4_1 (d = scale, m = -zero * scale in float16) ---------------------------------------------
@pytest.mark.parametrize("fmt", [{"type": "int_fz", "bits": 4, "granularity": 64},
                                 {"type": "int_fz", "bits": 3, "granularity": "channel"},
                                 {"type": "int_fz", "bits": 4, "granularity": 32, "zero_dtype": "float32"}],
                         ids=lambda f: json.dumps(f))
def test_q4_1_holds_hqq_layers_within_the_reported_bound(fmt):
    cfg = HQQConfig(format=fmt)
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(2))
    qt = hqq_quantize(w, cfg)
    data, err = codec("Q4_1").carry(qt)
    theirs = gguf.quants.dequantize(data, codec("Q4_1").qtype()).reshape(16, 256)
    ours = qt.dequantize().numpy()
    assert np.abs(theirs - ours).max() == err  # the bound the export reports is the real one
    # m = -zero * scale is exact in float32 and rounded once to float16: half a float16 ulp of |m|
    scale = qt.fmt.load_params(qt.params)["scale"].max()
    zero = qt.fmt.load_params(qt.params)["zero"].abs().max()
    assert 0 < err <= 2.0**-11 * float(scale * zero) * (1 + 2**-10)


def test_q4_1_refuses_what_it_cannot_hold():
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(3))
    for fmt in ({"type": "int_fz", "bits": 8, "granularity": 32}, {"type": "int_fz", "bits": 4, "granularity": 16},
                {"type": "int_fz", "bits": 4, "granularity": "tensor"}):
        assert codec("Q4_1").carry(hqq_quantize(w, HQQConfig(format=fmt))) is None, fmt
    qt = hqq_quantize(w, HQQConfig(format={"type": "int_fz", "bits": 4, "granularity": 32}))
    assert codec("Q4_0").carry(qt) is None and codec("Q8_0").carry(qt) is None


@pytest.fixture(scope="module")
def hqq_tiny(tmp_path_factory):
    """A tiny Llama (width 256) with a tokenizer, HQQ W4 g64."""
    d = tmp_path_factory.mktemp("tiny256hqq")
    make_tiny_llama(seed=5, hidden=256, inter=512).save_pretrained(d)
    make_tokenizer(d)
    lm = mp.load(str(d))
    mp.compress(lm, "hqq-w4-g64", progress=False)
    return lm


def test_gguf_q4_1_export_read_back_by_gguf_py(hqq_tiny, tmp_path):
    from tests.export.test_gguf_export import _read_back

    lm = hqq_tiny
    rep = export(lm, "gguf", tmp_path / "m.gguf", gguf_type="Q4_1", float_type="F32")
    carried = [t for t in rep.tensors if t.target == "Q4_1"]
    assert len(carried) == 14 and {t.action for t in carried} <= {"lossless", "near-lossless"}
    tensors, _ = _read_back(tmp_path / "m.gguf", lm)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, lm.module.config.num_hidden_layers)
    for name, m in lm.module.named_modules():
        if isinstance(m, QuantLinear):
            arr, ttype = tensors[names.get_name(name + ".weight", try_suffixes=(".weight",))]
            ours = m.dequantized_weight().numpy()
            qt = m.qtensor()
            bound = 2.0**-11 * float((qt.fmt.load_params(qt.params)["scale"]
                                      * qt.fmt.load_params(qt.params)["zero"]).abs().max()) * (1 + 2**-10)
            assert ttype == "Q4_1" and np.abs(arr - ours).max() <= bound, name


def test_gguf_q4_0_refuses_hqq_layers_in_one_line(hqq_tiny, tmp_path):
    with pytest.raises(ModelpressError) as ei:
        export(hqq_tiny, "gguf", tmp_path / "m.gguf", gguf_type="Q4_0")
    msg = str(ei.value)
    assert "\n" not in msg and "cannot represent 14 layer(s)" in msg
    assert "model.layers.0.self_attn.q_proj.weight: int_fz g64 is not on Q4_0's grid" in msg
    assert not (tmp_path / "m.gguf").exists()
