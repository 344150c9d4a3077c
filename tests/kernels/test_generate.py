"""Our static-cache generation against transformers' generate, and KV-cache quantisation."""
from __future__ import annotations

import pytest
import torch

from modelpress.core.errors import ModelpressError
from modelpress.kernels import cast_float_parts, install_kernels
from modelpress.kernels.generate import LlamaRunner
from modelpress.kernels.kvcache import KVCacheQuant, StaticKVCache, dequantize_kv, quantize_kv
from modelpress.quant.formats import IntFormat
from modelpress.quant.qlinear import QuantLinear
from tests.conftest import make_tiny_llama


@pytest.fixture(scope="module")
def llama():
    return make_tiny_llama(seed=1, layers=2)


def test_greedy_tokens_equal_hf_generate(llama) -> None:
    ids = torch.randint(2, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    hf = llama.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)
    ours = LlamaRunner(llama).generate(ids, 24)
    assert torch.equal(ours.ids, hf)
    assert ours.new_tokens == 24 and len(ours.decode_s) == 23


def test_chunked_prefill_equals_full_forward(llama) -> None:
    ids = torch.randint(2, 300, (1, 12), generator=torch.Generator().manual_seed(1))
    ref = llama(ids).logits
    r = LlamaRunner(llama)
    cache = r.new_cache(1, 16)
    r.forward(ids[:, :5], cache, 0)
    assert torch.allclose(r.forward(ids[:, 5:], cache, 5), ref[:, 5:], atol=1e-5)


def test_sampling_is_seeded(llama) -> None:
    ids = torch.randint(2, 300, (1, 4), generator=torch.Generator().manual_seed(2))
    r = LlamaRunner(llama)
    a = r.generate(ids, 10, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(5)).ids
    b = r.generate(ids, 10, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(5)).ids
    assert torch.equal(a, b)


def test_quantised_model_with_kernels_generates_like_reference(llama) -> None:
    import copy

    m = copy.deepcopy(llama)
    fmt = IntFormat(bits=4, granularity=32)
    for layer in m.model.layers:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            lin = getattr(layer.self_attn, name)
            setattr(layer.self_attn, name, QuantLinear.from_linear_weight(fmt.quantize(lin.weight.detach()), None))
    ids = torch.randint(2, 300, (1, 6), generator=torch.Generator().manual_seed(3))
    ref = m(ids).logits  # QuantLinear reference kernel, float32
    plan = install_kernels(m, dtype=torch.float32)
    assert plan.counts() == {"int4pack": 8}
    r = LlamaRunner(m)
    assert torch.allclose(r.forward(ids, r.new_cache(1, 8), 0), ref, atol=1e-4)
    cast_float_parts(m, torch.bfloat16)  # bf16 end to end still runs and stays close
    assert m.lm_head.weight is m.model.embed_tokens.weight and m.lm_head.weight.dtype == torch.bfloat16
    r16 = LlamaRunner(m)
    out = r16.forward(ids, r16.new_cache(1, 8), 0).float()
    assert (out - ref).abs().max() / ref.abs().max() < 0.05


@pytest.mark.parametrize("kind,bound", [("int8", 0.5 / 127), ("fp8", 2.0 ** -4)])
def test_kv_quant_roundtrip_error_bound(kind: str, bound: float) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 50, 16, generator=g) * torch.tensor([0.5, 2.0, 8.0]).reshape(3, 1, 1)
    amax = x.abs().amax(dim=(0, 2, 3))  # per head, (3,)
    q = KVCacheQuant.from_amax(kind, amax, amax)
    scale = q.k_scale.reshape(3, 1, 1)
    y = dequantize_kv(quantize_kv(x, scale, kind), scale, torch.float32)
    if kind == "int8":  # half a step of the per-head scale
        assert ((y - x).abs() <= scale * 0.5 + 1e-6).all()
    else:  # E4M3 round to nearest: relative error <= 2**-4 on normals, absolute 2**-10 * s on subnormals
        assert ((y - x).abs() <= torch.maximum(x.abs() * bound, scale * 2.0 ** -10) + 1e-7).all()
    assert torch.allclose(y.abs().amax(dim=(0, 2, 3)), amax, rtol=bound)  # no clipping at the calibrated max


def test_kv_calibration_scales_and_cache_memory(llama) -> None:
    r = LlamaRunner(llama)
    ids = torch.randint(2, 300, (3, 20), generator=torch.Generator().manual_seed(4))
    kvq = KVCacheQuant.calibrate(r, ids, kind="int8")
    assert kvq.k_scale.shape == (2, r.kv_heads)
    # independent amax: run the HF model's k_proj + RoPE? use our float cache directly per sequence
    expect = torch.zeros(2, r.kv_heads)
    for row in ids:
        c = r.new_cache(1, 20)
        r.forward(row[None], c, 0)
        expect = torch.maximum(expect, torch.stack([c.k[i].abs().amax(dim=(0, 2, 3)) for i in range(2)]))
    assert torch.allclose(kvq.k_scale * 127, expect)
    q = StaticKVCache(2, 1, r.kv_heads, 100, r.head_dim, torch.float32, kvq)
    f = StaticKVCache(2, 1, r.kv_heads, 100, r.head_dim, torch.float32, None)
    assert f.nbytes() == 4 * q.nbytes()
    # generation with the quantised cache stays close to the float one
    r_q = LlamaRunner(llama, kv_quant=kvq)
    ref = r.forward(ids[:1], r.new_cache(1, 20), 0)
    out = r_q.forward(ids[:1], r_q.new_cache(1, 20), 0)
    assert (out - ref).abs().max() / ref.abs().max() < 0.05


def test_kv_cache_scheme_is_valid_compressed_tensors(llama) -> None:
    qa = pytest.importorskip("compressed_tensors.quantization")
    kvq = KVCacheQuant.from_amax("fp8", torch.ones(2, 2) * 448, torch.ones(2, 2) * 896)
    args = qa.QuantizationArgs.model_validate(kvq.kv_cache_scheme())
    assert args.type == "float" and args.strategy == "attn_head" and args.num_bits == 8
    sd = kvq.scale_state_dict()
    assert sd["model.layers.1.self_attn.v_scale"].shape == (2, 1, 1)
    assert float(sd["model.layers.0.self_attn.v_scale"][0]) == 2.0


def test_unsupported_architecture_refused() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ModelpressError, match="supports llama"):
        LlamaRunner(m)


def test_fused_projections_give_the_same_logits_in_fewer_calls(llama) -> None:
    """q/k/v and gate/up stacked into one QuantLinear each: same function (rows are independent)."""
    import copy

    from modelpress.kernels import fuse_projections

    m = copy.deepcopy(llama)
    fmt = IntFormat(bits=4, granularity=32, symmetric=False)
    for layer in m.model.layers:
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                              (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                lin = getattr(parent, name)
                setattr(parent, name, QuantLinear.from_linear_weight(fmt.quantize(lin.weight.detach()), None))
    ids = torch.randint(2, 300, (1, 7), generator=torch.Generator().manual_seed(4))
    ref = m(ids).logits
    assert fuse_projections(m) == 4  # 2 layers x (qkv, gate/up)
    attn, mlp = m.model.layers[0].self_attn, m.model.layers[0].mlp
    assert not hasattr(attn, "q_proj") and not hasattr(mlp, "up_proj")
    assert attn.qkv_fused_sizes == [attn.config.num_attention_heads * attn.head_dim,
                                    attn.config.num_key_value_heads * attn.head_dim,
                                    attn.config.num_key_value_heads * attn.head_dim]
    r = LlamaRunner(m)
    assert torch.allclose(r.forward(ids, r.new_cache(1, 8), 0), ref, atol=1e-5)
    plan = install_kernels(m, dtype=torch.float32)  # the fused weights take the packed kernel too
    assert plan.counts() == {"int4pack": 8}
    r = LlamaRunner(m)
    assert torch.allclose(r.forward(ids, r.new_cache(1, 8), 0), ref, atol=1e-4)
