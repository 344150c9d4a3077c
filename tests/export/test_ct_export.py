"""compressed-tensors export: packing equals the library's, its decompressors and transformers load our files."""
from __future__ import annotations

import json

import pytest
import torch

import modelpress as mp
from modelpress.core.errors import ModelpressError
from modelpress.export.codecs.compressed_tensors import pack_int32
from modelpress.export.export import export
from modelpress.quant.algos.rtn.rtn import RTNConfig
from modelpress.quant.qlinear import QuantLinear
from tests.conftest import make_tiny_llama

ct = pytest.importorskip("compressed_tensors")


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("cols", [32, 45, 96])
def test_pack_int32_equals_library(bits, cols):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    codes = torch.randint(0, 1 << bits, (7, cols), dtype=torch.uint8)
    ref = pack_to_int32((codes.to(torch.int16) - (1 << (bits - 1))).to(torch.int8), bits)
    assert torch.equal(pack_int32(codes, bits), ref)


FORMATS = [
    {"type": "int", "bits": 4, "granularity": 32},
    {"type": "int", "bits": 4, "symmetric": False, "granularity": 32},
    {"type": "int", "bits": 8, "granularity": "channel"},
    {"type": "int", "bits": 3, "symmetric": False, "granularity": "channel"},
    {"type": "int", "bits": 4, "granularity": "tensor"},
    {"type": "fp8", "variant": "e4m3"},
    {"type": "fp8", "variant": "e4m3", "granularity": "tensor"},
    {"type": "nvfp4"},
    {"type": "mxfp4"},
]


def _quantised(fmt, seed=3):
    lm = mp.load(make_tiny_llama(seed=seed))
    mp.apply(lm, RTNConfig(format=fmt, ignore=["lm_head"]))
    return lm


def _library_decompress(folder):
    """Each quantised Linear's weight as the library's own compressor decompresses it."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    qcfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    config = QuantizationConfig.model_validate(qcfg)
    sd = load_file(str(folder / "model.safetensors"))
    out = {}
    for scheme in config.config_groups.values():
        comp = BaseCompressor.get_value_from_registry(scheme.format)
        for name in scheme.targets:
            own = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
            if "weight_scale" in own and own["weight_scale"].dtype == torch.float16:
                own["weight_scale"] = own["weight_scale"].float()  # the float32 parameter a model loads it into
            out[name] = comp.decompress(own, scheme)["weight"]
    return config, qcfg, out


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: json.dumps(f))
def test_library_decompresses_our_weights(fmt, tmp_path):
    lm = _quantised(fmt)
    rep = export(lm, "compressed-tensors", tmp_path / "ct")
    assert rep.counts() == {"lossless": 14}
    config, raw, weights = _library_decompress(tmp_path / "ct")
    # the config is in the library's canonical form: validating and dumping it changes nothing
    assert config.model_dump(exclude=["quant_method"]).items() <= raw.items()
    assert len(weights) == 14
    for name, w in weights.items():
        ours = lm.module.get_submodule(name).dequantized_weight()
        if fmt["type"] in ("nvfp4", "mxfp4"):  # the library decompresses FP4 in bfloat16
            torch.testing.assert_close(w.float(), ours, rtol=2.0 ** -7, atol=0, msg=name)
        else:
            assert torch.equal(w.float(), ours), name


@pytest.mark.parametrize("fmt", [FORMATS[0], FORMATS[2], FORMATS[5]], ids=["int4g32", "int8ch", "fp8ch"])
def test_transformers_loads_ct_export_with_matching_logits(fmt, tmp_path):
    from transformers import AutoModelForCausalLM

    lm = _quantised(fmt, seed=4)
    export(lm, "compressed-tensors", tmp_path / "ct")
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"), dtype=torch.float32)
    ids = torch.randint(0, 300, (1, 24))
    with torch.no_grad():
        theirs, ours = ref(input_ids=ids).logits, lm.module(input_ids=ids).logits
    assert (theirs - ours).abs().max() / ours.abs().max() < 1e-3


def test_transformers_loads_asymmetric_with_dequantize(tmp_path):
    """Asymmetric pack-quantized loads only through transformers' dequantize path (its compressed
    path builds an unpacked zero point that cannot take the packed one the library writes)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    lm = _quantised(FORMATS[1], seed=5)
    export(lm, "compressed-tensors", tmp_path / "ct")
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"), dtype=torch.float32,
                                               quantization_config=CompressedTensorsConfig(dequantize=True))
    ids = torch.randint(0, 300, (1, 24))
    with torch.no_grad():
        theirs, ours = ref(input_ids=ids).logits, lm.module(input_ids=ids).logits
    assert (theirs - ours).abs().max() / ours.abs().max() < 1e-3


def test_unrepresentable_layers_listed_then_dequantized_or_requantized(tmp_path):
    lm = mp.load(make_tiny_llama(seed=6))  # widths 64 and 128
    mp.apply(lm, RTNConfig(format={"type": "int", "bits": 4, "granularity": 48}, ignore=["lm_head"]))
    with pytest.raises(ModelpressError, match=r"cannot represent 14 layer\(s\): model.layers.0.self_attn.q_proj: "
                                              r"group size 48 does not divide 64"):
        export(lm, "compressed-tensors", tmp_path / "a")
    assert not (tmp_path / "a").exists()
    rep = export(lm, "compressed-tensors", tmp_path / "b", on_unsupported="dequantize")
    assert rep.counts() == {"dequantized": 14}
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.mlp.down_proj" in cfg["ignore"] and cfg["config_groups"] == {}
    rep = export(lm, "compressed-tensors", tmp_path / "c", on_unsupported="requantize")
    assert rep.counts() == {"requantized": 14}
    _, _, weights = _library_decompress(tmp_path / "c")
    for name, w in weights.items():  # re-quantised per channel (48 -> 24 -> 12 never divides 64)
        ours = lm.module.get_submodule(name).dequantized_weight()
        assert (w.float() - ours).abs().max() < 0.25 * ours.abs().max()


def test_nf4_and_e5m2_have_no_ct_format(tmp_path):
    lm = _quantised({"type": "fp8", "variant": "e5m2"})
    with pytest.raises(ModelpressError, match="E4M3 only"):
        export(lm, "compressed-tensors", tmp_path / "a")
    lm = _quantised({"type": "nf4"})
    with pytest.raises(ModelpressError, match="no format for nf4"):
        export(lm, "compressed-tensors", tmp_path / "b")


def test_hf_export_reloads_with_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    lm = _quantised({"type": "int", "bits": 4, "granularity": 32}, seed=7)
    rep = export(lm, "hf", tmp_path / "hf")
    assert rep.counts() == {"dequantized": 14}
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    assert not any(isinstance(m, QuantLinear) for m in ref.modules())
    ids = torch.randint(0, 300, (1, 24))
    with torch.no_grad():
        assert torch.equal(ref(input_ids=ids).logits, lm.module(input_ids=ids).logits)
    assert any(isinstance(m, QuantLinear) for m in lm.module.modules())  # the source model is untouched


def test_kv_cache_scheme_and_scales_written(tmp_path):
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    kvcache = pytest.importorskip("modelpress.kernels.kvcache")
    lm = _quantised(FORMATS[0])
    kvq = kvcache.KVCacheQuant.from_amax("fp8", torch.rand(2, 2) + 1, torch.rand(2, 2) + 1)
    export(lm, "compressed-tensors", tmp_path / "ct", kv_cache=kvq)
    raw = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    cfg = QuantizationConfig.model_validate(raw)
    assert cfg.kv_cache_scheme.type == "float" and cfg.kv_cache_scheme.strategy == "attn_head"
    sd = load_file(str(tmp_path / "ct" / "model.safetensors"))
    assert torch.equal(sd["model.layers.1.self_attn.k_scale"].reshape(-1), kvq.k_scale[1])
    assert sd["model.layers.0.self_attn.v_scale"].shape == (2, 1, 1)


def test_pruned_model_exports_dense_and_loads(tmp_path):
    """Pruned (SparseLayer) weights: compressed-tensors 0.20 has no sparse compressor, so they are written dense."""
    from transformers import AutoModelForCausalLM

    lm = mp.load(make_tiny_llama(seed=9))
    mp.compress(lm, "magnitude-2of4", progress=False)
    rep = export(lm, "compressed-tensors", tmp_path / "ct")
    assert rep.counts() == {"copied": 14}
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"), dtype=torch.float32)
    w = ref.model.layers[0].mlp.up_proj.weight.reshape(-1, 4)
    assert ((w == 0).sum(dim=1) >= 2).all()  # the 2:4 pattern survives
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        assert torch.equal(ref(input_ids=ids).logits, lm.module(input_ids=ids).logits)
