"""GGUF export: block layouts checked by gguf-py's own dequantisers, lossless carry-over, real readers."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import modelpress as mp
from modelpress.core.errors import ModelpressError
from modelpress.export.codecs.gguf_blocks import _kquant_asym, codec
from modelpress.export.export import export
from modelpress.quant.algos.rtn.rtn import RTNConfig
from modelpress.quant.formats import format_from_dict
from modelpress.quant.qlinear import QuantLinear
from tests.conftest import make_tiny_llama, make_tokenizer

gguf = pytest.importorskip("gguf")


def _deq(data: np.ndarray, name: str, shape: tuple[int, int]) -> np.ndarray:
    return gguf.quants.dequantize(data, codec(name).qtype()).reshape(shape)


@pytest.mark.parametrize("name", ["Q4_K", "Q5_K"])
def test_kquant_bytes_decode_to_our_own_reconstruction(name):
    """Our packer's bytes, read by gguf-py's dequantiser, equal d*sc*q - dmin*m from our fields exactly."""
    torch.manual_seed(0)
    w = (torch.randn(6, 512) * torch.linspace(0.1, 3, 512)).numpy()
    nmax = 15 if name == "Q4_K" else 31
    q, d, dmin, sc, mn = _kquant_asym(w.reshape(-1, 8, 32), nmax)
    ours = (d.astype(np.float32)[:, None, None] * sc[..., None] * q
            - dmin.astype(np.float32)[:, None, None] * mn[..., None]).reshape(6, 512)
    theirs = _deq(codec(name).quantize(w), name, (6, 512))
    np.testing.assert_array_equal(theirs, ours)
    assert np.sqrt(((theirs - w) ** 2).mean()) < (0.06 if name == "Q4_K" else 0.03) * np.abs(w).max()


def test_q6k_bytes_decode_to_our_own_reconstruction():
    torch.manual_seed(1)
    w = torch.randn(4, 768).numpy()
    data = codec("Q6_K").quantize(w)
    assert data.shape == (4, 3 * 210)
    # independent re-derivation of the fields from the bytes per ggml-common.h, then compare
    blk = data.reshape(-1, 210)
    ql, qh, sc, d = blk[:, :128], blk[:, 128:192], blk[:, 192:208].view(np.int8), blk[:, 208:].copy().view(np.float16)
    vals = np.zeros((blk.shape[0], 256), dtype=np.float32)
    for n in range(blk.shape[0]):
        for h in range(2):
            for l in range(32):  # noqa: E741  (ggml's loop variable)
                b0, b1, hb = ql[n, h * 64 + l], ql[n, h * 64 + l + 32], qh[n, h * 32 + l]
                qs = [(b0 & 0xF) | ((hb & 3) << 4), (b1 & 0xF) | (((hb >> 2) & 3) << 4),
                      (b0 >> 4) | (((hb >> 4) & 3) << 4), (b1 >> 4) | (((hb >> 6) & 3) << 4)]
                for s, qv in enumerate(qs):
                    e = h * 128 + s * 32 + l
                    vals[n, e] = np.float32(d[n, 0]) * np.float32(sc[n, e // 16]) * (int(qv) - 32)
    np.testing.assert_array_equal(_deq(data, "Q6_K", (4, 768)), vals.reshape(4, 768))
    assert np.sqrt(((vals.reshape(4, 768) - w) ** 2).mean()) < 0.03 * np.abs(w).max()


@pytest.mark.parametrize("fmt,name,exact", [
    ({"type": "int", "bits": 4, "granularity": 64}, "Q4_0", True),
    ({"type": "int", "bits": 4, "granularity": 32}, "Q4_1", True),
    ({"type": "int", "bits": 3, "granularity": "channel"}, "Q4_0", True),
    ({"type": "int", "bits": 8, "granularity": "channel"}, "Q8_0", True),
    ({"type": "int", "bits": 4, "granularity": 128}, "Q8_0", True),
    ({"type": "int", "bits": 4, "symmetric": False, "granularity": 32}, "Q4_1", False),
])
def test_matching_grids_carry_codes_over(fmt, name, exact):
    torch.manual_seed(2)
    qt = format_from_dict(fmt).quantize(torch.randn(16, 256))
    data, err = codec(name).from_qtensor(qt)
    theirs, ours = _deq(data, name, (16, 256)), qt.dequantize().numpy()
    if exact:
        np.testing.assert_array_equal(theirs, ours)
        assert err == 0
    else:  # asymmetric: codes and d kept, m = -zero * d rounded to fp16 (half an fp16 ulp of m)
        assert 0 < np.abs(theirs - ours).max() <= err <= 2.0 ** -11 * np.abs(ours).max() * 16


@pytest.mark.parametrize("fmt,name", [({"type": "int", "bits": 4, "symmetric": False, "granularity": 32}, "Q4_0"),
                                      ({"type": "int", "bits": 4, "granularity": 16}, "Q4_0"),
                                      ({"type": "int", "bits": 8, "granularity": "channel"}, "Q4_1"),
                                      ({"type": "nf4"}, "Q4_0")])
def test_mismatched_grids_are_not_carried(fmt, name):
    qt = format_from_dict(fmt).quantize(torch.randn(8, 128))
    assert codec(name).from_qtensor(qt) is None


@pytest.fixture(scope="module")
def quantised_tiny(tmp_path_factory):
    """A tiny Llama (width 256, so K-quants tile its rows) with a tokenizer, RTN int4 g64."""
    d = tmp_path_factory.mktemp("tiny256")
    make_tiny_llama(seed=5, hidden=256, inter=512).save_pretrained(d)
    make_tokenizer(d)
    lm = mp.load(str(d))
    mp.apply(lm, RTNConfig(format={"type": "int", "bits": 4, "granularity": 64}, ignore=["lm_head"]))
    return lm


def _read_back(path, lm):
    """Every GGUF tensor dequantised by gguf-py, rotary rows restored, keyed by GGUF name."""
    from modelpress.export.writers.gguf import _permute_rotary

    cfg = lm.module.config
    r = gguf.GGUFReader(str(path))
    out = {}
    for t in r.tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)])
        if t.name.endswith(("attn_q.weight", "attn_k.weight")):  # undo the permutation (apply its inverse)
            heads = cfg.num_attention_heads if "attn_q" in t.name else cfg.num_key_value_heads
            idx = np.arange(arr.shape[0])[:, None]
            perm = _permute_rotary(idx, "x.self_attn.q_proj.weight", type("C", (), {"num_attention_heads": heads}))
            inv = np.empty_like(perm[:, 0])
            inv[perm[:, 0]] = np.arange(arr.shape[0])
            arr = arr[inv]
        out[t.name] = (arr, t.tensor_type.name)
    return out, r


def test_gguf_q4_0_lossless_tensor_by_tensor_and_transformers_logits(quantised_tiny, tmp_path):
    lm = quantised_tiny
    path = tmp_path / "m.gguf"
    rep = export(lm, "gguf", path, gguf_type="Q4_0", float_type="F32")
    assert rep.counts()["lossless"] == 14
    tensors, reader = _read_back(path, lm)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    import gguf as g

    names = g.get_tensor_name_map(g.MODEL_ARCH.LLAMA, lm.module.config.num_hidden_layers)
    for name, m in lm.module.named_modules():
        if isinstance(m, QuantLinear):
            arr, ttype = tensors[names.get_name(name + ".weight", try_suffixes=(".weight",))]
            assert ttype == "Q4_0"
            np.testing.assert_array_equal(arr, m.dequantized_weight().numpy(), err_msg=name)
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    ids = torch.randint(0, 300, (1, 24))
    with torch.no_grad():
        assert torch.equal(ref(input_ids=ids).logits, lm.module(input_ids=ids).logits)


def test_gguf_kquant_requantised_and_reported(quantised_tiny, tmp_path):
    lm = quantised_tiny
    first = "model.layers.0.self_attn.q_proj.weight: int4 sym g64 is not on Q5_K's grid"
    with pytest.raises(ModelpressError, match=rf"GGUF Q5_K .*cannot represent 14 layer\(s\): {re.escape(first)}"):
        export(lm, "gguf", tmp_path / "refused.gguf", gguf_type="Q5_K")  # a K-quant holds none of our grids
    rep = export(lm, "gguf", tmp_path / "k.gguf", gguf_type="Q5_K", on_unsupported="requantize")
    assert rep.counts()["requantized"] == 14
    assert any(n.startswith("--on-unsupported requantize: 14 tensor(s) GGUF Q5_K cannot hold") for n in rep.notes)
    tensors, _ = _read_back(tmp_path / "k.gguf", lm)
    arr, ttype = tensors["blk.0.ffn_down.weight"]
    w = lm.module.model.layers[0].mlp.down_proj.dequantized_weight().numpy()
    assert ttype == "Q5_K" and np.sqrt(((arr - w) ** 2).mean()) < 0.05 * np.abs(w).max()


def test_kquant_on_rows_it_cannot_tile_refuses_or_falls_back(tmp_path):
    lm = mp.load(make_tiny_llama(seed=6))  # width 64: no 256-value super-blocks
    mp.apply(lm, RTNConfig(format={"type": "int", "bits": 4, "granularity": 32}, ignore=["lm_head"]))
    with pytest.raises(ModelpressError, match=r"cannot represent .*Q4_K needs rows in multiples of 256"):
        export(lm, "gguf", tmp_path / "a.gguf", gguf_type="Q4_K")
    assert not (tmp_path / "a.gguf").exists()
    rep = export(lm, "gguf", tmp_path / "b.gguf", gguf_type="Q4_K", on_unsupported="requantize")
    assert {t.target for t in rep.tensors if t.name.startswith("blk.0.attn_q")} == {"Q5_0"}  # llama.cpp's fallback
    rep = export(lm, "gguf", tmp_path / "c.gguf", gguf_type="Q4_K", on_unsupported="dequantize")
    assert {t.target for t in rep.tensors if t.name.startswith("blk.0.attn_q")} == {"F16"}


def test_architecture_without_gguf_mapping_is_one_line_error(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    lm = mp.load(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)))
    with pytest.raises(ModelpressError, match="no mapping for architecture 'gpt2'"):
        export(lm, "gguf", tmp_path / "g.gguf")


def _tiny_in(fmt: dict):
    """A width-64 tiny Llama with every projection in ``fmt``."""
    lm = mp.load(make_tiny_llama(seed=7))
    mp.apply(lm, RTNConfig(format=fmt, ignore=["lm_head"]))
    return lm


def _layer_rows(rep):
    """(target, action) of the 14 projection weights (not embeddings, norms)."""
    return {(t.target, t.action) for t in rep.tensors if t.name.startswith("blk.") and "norm" not in t.name}


@pytest.mark.parametrize("fmt,gtype,described", [
    ({"type": "nf4", "granularity": 64}, "Q4_0", "nf4 g64"),
    ({"type": "fp8"}, "Q8_0", "fp8 e4m3 channel"),
    ({"type": "mxfp4"}, "Q4_0", "mxfp4 g32"),
    ({"type": "nvfp4"}, "Q4_1", "nvfp4 g16"),
    ({"type": "int", "bits": 4, "symmetric": False, "granularity": 32}, "Q4_0", "int4 asym g32"),
    ({"type": "int", "bits": 4, "granularity": 16}, "Q8_0", "int4 sym g16"),
    ({"type": "int", "bits": 8, "granularity": "channel"}, "Q4_1", "int8 sym channel"),
])
def test_layers_the_type_cannot_hold_are_refused_unless_asked(fmt, gtype, described, tmp_path):
    """Issue: --format gguf re-quantised an nf4 model under the default --on-unsupported refuse."""
    lm = _tiny_in(fmt)
    first = f"model.layers.0.self_attn.q_proj.weight: {described} is not on {gtype}'s grid"
    with pytest.raises(ModelpressError, match=rf"^GGUF {gtype} \(holds exactly: .*\) cannot represent 14 layer\(s\): "
                                              rf"{re.escape(first)};.*Choose --on-unsupported"):
        export(lm, "gguf", tmp_path / "a.gguf", gguf_type=gtype)
    assert not (tmp_path / "a.gguf").exists()
    rep = export(lm, "gguf", tmp_path / "r.gguf", gguf_type=gtype, on_unsupported="requantize")
    assert _layer_rows(rep) == {(gtype, "requantized")}
    assert rep.notes[0].startswith(f"--on-unsupported requantize: 14 tensor(s) GGUF {gtype} cannot hold were "
                                   f"quantised from our dequantised weight: {first} -> {gtype}")
    rep = export(lm, "gguf", tmp_path / "d.gguf", gguf_type=gtype, on_unsupported="dequantize")
    assert _layer_rows(rep) == {("F16", "dequantized")} and "written as float" in rep.notes[0]


def test_float_gguf_types_take_any_layer_dequantised(tmp_path):
    """--gguf-type F32/F16 asks for float weights: nothing to refuse, F32 holds our weights exactly."""
    lm = _tiny_in({"type": "nf4", "granularity": 64})
    rep = export(lm, "gguf", tmp_path / "f.gguf", gguf_type="F32")
    assert _layer_rows(rep) == {("F32", "dequantized")} and not any("on-unsupported" in n for n in rep.notes)
    tensors, _ = _read_back(tmp_path / "f.gguf", lm)
    w = lm.module.model.layers[1].mlp.down_proj.dequantized_weight().numpy()
    np.testing.assert_array_equal(tensors["blk.1.ffn_down.weight"][0], w)


def test_activation_quantised_layers_are_refused(tmp_path):
    lm = mp.load(make_tiny_llama(seed=8))
    mp.compress(lm, "int8-dynamic", progress=False)
    with pytest.raises(ModelpressError, match="q_proj.weight: modelpress layer 'w8a8_linear' has no GGUF encoding"):
        export(lm, "gguf", tmp_path / "a.gguf", gguf_type="Q8_0")
    rep = export(lm, "gguf", tmp_path / "b.gguf", gguf_type="Q8_0", on_unsupported="requantize")
    assert _layer_rows(rep) == {("Q8_0", "requantized")}


def test_cli_nf4_model_to_gguf_refuses_in_one_line(tmp_path, capsys):
    """The reported reproduction: compress with an NF4 recipe, export to GGUF with the default policy."""
    from modelpress.cli.main import main

    src = tmp_path / "tiny"
    make_tiny_llama(seed=9).save_pretrained(src)
    make_tokenizer(src)
    recipe = tmp_path / "nf4.yaml"
    recipe.write_text("name: nf4-g64\ndescription: NF4 groups of 64\nstages:\n  - method: rtn\n    ignore: [lm_head]\n"
                      "    format: {type: nf4, granularity: 64}\n")
    argv = ["--quiet", "compress", "--model", str(src), "--recipe", str(recipe), "--output", str(tmp_path / "o")]
    assert main(argv) == 0
    capsys.readouterr()
    out = tmp_path / "o.gguf"
    assert main(["export", "--model", str(tmp_path / "o"), "--format", "gguf", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot represent 14 layer(s)" in err[0] and "nf4 g64 is not on Q4_0's grid" in err[0]
    assert not out.exists()
    assert main(["export", "--model", str(tmp_path / "o"), "--format", "gguf", "--output", str(out),
                 "--on-unsupported", "requantize"]) == 0
    err = capsys.readouterr().err
    assert "14 requantized" in err and "note: --on-unsupported requantize: 14 tensor(s) GGUF Q4_0 cannot hold" in err
