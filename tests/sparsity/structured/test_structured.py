"""Structured pruning: removing units that were already silent changes nothing; the smaller model
saves, reloads with plain transformers and matches; scores find planted unimportant units."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers

import modelpress as mp
from modelpress.core.errors import ModelpressError
from modelpress.sparsity.structured import heads_to_remove, prune_heads, prune_neurons, remove_layers, unit_scores
from tests.conftest import make_tiny_llama

IDS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))


def logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def calib() -> torch.Tensor:
    return torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(2))


def silence_heads(model, heads: list[int], head_dim: int = 16) -> None:
    """Zero the o_proj columns of ``heads`` in every layer: those heads add nothing to the output."""
    for layer in model.model.layers:
        for h in heads:
            layer.self_attn.o_proj.weight.data[:, h * head_dim:(h + 1) * head_dim] = 0


@pytest.mark.parametrize("heads", [[1, 2], [2, 3]], ids=["one-per-kv-group", "whole-kv-group"])
def test_pruning_silent_heads_keeps_outputs(heads):
    model = make_tiny_llama(seed=3)  # 4 query heads sharing 2 K/V heads, head_dim 16
    silence_heads(model, heads)
    ref = logits(model)
    lm = mp.load(model)
    new = prune_heads(lm, heads)
    cfg = lm.module.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (new.heads, new.kv_heads)
    assert (new.heads, new.kv_heads) == ((2, 2) if heads == [1, 2] else (2, 1))
    assert lm.module.model.layers[0].self_attn.q_proj.weight.shape == (32, 64)
    assert lm.module.model.layers[0].self_attn.o_proj.weight.shape == (64, 32)
    torch.testing.assert_close(logits(lm.module), ref, atol=1e-5, rtol=1e-5)


def test_pruning_silent_neurons_keeps_outputs():
    model = make_tiny_llama(seed=4)
    drop = [0, 5, 17, 100, 127]
    for layer in model.model.layers:
        layer.mlp.down_proj.weight.data[:, drop] = 0
    ref = logits(model)
    lm = mp.load(model)
    assert prune_neurons(lm, drop) == 123
    assert lm.module.config.intermediate_size == 123
    assert lm.module.model.layers[1].mlp.gate_proj.weight.shape == (123, 64)
    torch.testing.assert_close(logits(lm.module), ref, atol=1e-5, rtol=1e-5)


def test_pruning_live_heads_changes_outputs():
    """The control: the equality above is not trivially true."""
    model = make_tiny_llama(seed=3)
    ref = logits(model)
    lm = mp.load(model)
    prune_heads(lm, [1, 2])
    assert (logits(lm.module) - ref).abs().max() > 1e-3


def test_saved_model_reloads_with_plain_transformers(tmp_path, calib):
    lm = mp.load(make_tiny_llama(seed=5, layers=3))
    n0 = sum(p.numel() for p in lm.module.parameters())
    mp.apply(lm, {"stages": [{"method": "structured", "heads_fraction": 0.5, "mlp_fraction": 0.25, "layers": 1}]},
             calib=calib, progress=False)
    ours = logits(lm.module)
    mp.save(lm, tmp_path / "out")
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    cfg = plain.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (2, 2, 16)
    assert (cfg.intermediate_size, cfg.num_hidden_layers) == (96, 2)
    assert sum(p.numel() for p in plain.parameters()) < n0
    torch.testing.assert_close(logits(plain), ours, atol=1e-5, rtol=1e-5)
    again = mp.load(tmp_path / "out")  # modelpress's own loader (sha256-checked) too
    torch.testing.assert_close(logits(again.module), ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gqa", ["query", "kv"])
def test_gqa_pruning_keeps_model_valid(gqa, calib):
    """Cached generation (which reads the K/V grouping at every step) equals full recomputation."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128)
    lm = mp.load(LlamaForCausalLM(cfg).eval())
    ctx = mp.apply(lm, {"stages": [{"method": "structured", "heads_fraction": 0.34, "gqa": gqa}]},
                   calib=calib, progress=False)
    c = lm.module.config
    assert (c.num_attention_heads, c.num_key_value_heads) == ((4, 2) if gqa == "query" else (3, 1))
    assert lm.module.model.layers[0].self_attn.num_key_value_groups == c.num_attention_heads // c.num_key_value_heads
    assert not ctx.warnings or "heads_fraction" in ctx.warnings[0]
    prompt = IDS[:1, :8]
    gen = lm.module.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    seq = prompt
    for _ in range(6):  # greedy by full forwards, no cache
        seq = torch.cat([seq, logits(lm.module, seq)[:, -1:].argmax(-1)], 1)
    assert torch.equal(gen, seq)


def test_heads_to_remove_keeps_groups_even():
    sc = torch.tensor([5.0, 1.0, 3.0, 0.5, 9.0, 2.0])  # 6 heads, 2 groups of 3
    assert heads_to_remove(sc, torch.tensor([1.0, 0.0]), 0.34, "query") == [1, 3]  # lowest of each group
    assert heads_to_remove(sc, torch.tensor([1.0, 0.0]), 0.5, "kv") == [3, 4, 5]  # the lower group


def test_unit_scores_equal_brute_force_contribution_norms():
    g = torch.Generator().manual_seed(0)
    X, W = torch.randn(50, 12, generator=g, dtype=torch.float64), torch.randn(7, 12, generator=g, dtype=torch.float64)
    got = unit_scores(W, X.T @ X, 4)
    want = torch.stack([(X[:, u * 4:(u + 1) * 4] @ W[:, u * 4:(u + 1) * 4].T).norm() for u in range(3)])
    torch.testing.assert_close(got, want)


def test_activation_score_finds_planted_weak_units(calib):
    model = make_tiny_llama(seed=6)
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight.data[:, 3 * 16:4 * 16] *= 1e-3  # head 3 barely contributes
        layer.mlp.down_proj.weight.data[:, 40:72] *= 1e-3  # so do neurons 40..71
    lm = mp.load(model)
    ctx = mp.apply(lm, {"stages": [{"method": "structured", "heads_fraction": 0.5, "mlp_fraction": 0.25}]},
                   calib=calib, progress=False)
    heads = [r.fmt["removed"] for r in ctx.layers if r.fmt["unit"] == "attention heads"]
    neurons = [r.fmt["removed"] for r in ctx.layers if r.fmt["unit"] == "MLP neurons"]
    assert all(3 in h for h in heads) and len(heads) == 2
    assert all(n == list(range(40, 72)) for n in neurons)


def test_block_influence_removes_identity_layer(calib):
    model = make_tiny_llama(seed=7, layers=4)
    model.model.layers[2].self_attn.o_proj.weight.data.zero_()  # the block now returns its input
    model.model.layers[2].mlp.down_proj.weight.data.zero_()
    ref = logits(model)
    lm = mp.load(model)
    ctx = mp.apply(lm, {"stages": [{"method": "structured", "layers": 1}]}, calib=calib, progress=False)
    assert ctx.layers[-1].fmt["removed"] == [2]
    assert lm.module.config.num_hidden_layers == 3 and len(lm.module.model.layers) == 3
    assert [b.self_attn.layer_idx for b in lm.module.model.layers] == [0, 1, 2]
    torch.testing.assert_close(logits(lm.module), ref, atol=1e-5, rtol=1e-5)
    gen = lm.module.generate(IDS[:1, :6], max_new_tokens=4, do_sample=False, pad_token_id=0)  # cache slots renumbered
    assert gen.shape == (1, 10)


def test_remove_layers_directly_matches_skipping_them():
    model = make_tiny_llama(seed=8, layers=3)
    lm = mp.load(copy.deepcopy(model))
    assert remove_layers(lm, [0]) == [1, 2]
    model.model.layers = model.model.layers[1:]  # the reference skips block 0 by hand
    model.config.num_hidden_layers = 2
    with torch.no_grad():
        want = model(input_ids=IDS, use_cache=False).logits
    torch.testing.assert_close(logits(lm.module), want)


def test_random_score_needs_no_calibration():
    lm = mp.load(make_tiny_llama(seed=9))
    mp.apply(lm, {"stages": [{"method": "structured", "heads_fraction": 0.5, "mlp_fraction": 0.25, "score": "random"}]},
             progress=False)
    assert lm.module.config.intermediate_size == 96
    with pytest.raises(ModelpressError, match="needs calibration"):
        mp.apply(mp.load(make_tiny_llama(seed=9)), "structured-25", progress=False)


def one_line_error(fn) -> str:
    with pytest.raises(ModelpressError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("field,value,expect", [
    ("heads_fraction", 1.0, "heads_fraction"), ("mlp_fraction", -0.1, "mlp_fraction"),
    ("mlp_fraction", 1.5, "mlp_fraction"), ("layers", 2, "cannot remove 2 of the model's 2"),
    ("heads_fraction", 0.9, "would remove all"),
])
def test_bad_requests_are_one_line_errors(field, value, expect, calib):
    lm = mp.load(make_tiny_llama(seed=10))
    msg = one_line_error(lambda: mp.apply(lm, {"stages": [{"method": "structured", field: value}]}, calib=calib,
                                          progress=False))
    assert expect in msg


def test_bad_direct_calls_are_one_line_errors():
    lm = mp.load(make_tiny_llama(seed=11))
    assert "out of range" in one_line_error(lambda: prune_heads(lm, [4]))
    assert "cannot remove all 4" in one_line_error(lambda: prune_heads(lm, [0, 1, 2, 3]))
    assert "same number in each" in one_line_error(lambda: prune_heads(lm, [0]))  # group sizes 1 and 2
    assert "same number in every block" in one_line_error(lambda: prune_neurons(lm, {0: [1], 1: [1, 2]}))
    assert "cannot remove all 2" in one_line_error(lambda: remove_layers(lm, [0, 1]))
    assert lm.module.config.num_attention_heads == 4  # nothing was half-done by the refused calls
    assert lm.module.model.layers[0].self_attn.q_proj.weight.shape == (64, 64)


def test_unsupported_architecture_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    lm = mp.load(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=300)).eval())
    msg = one_line_error(lambda: mp.apply(lm, {"stages": [{"method": "structured", "mlp_fraction": 0.25,
                                                             "score": "random"}]}, progress=False))
    assert "gpt2" in msg


def test_refit_recovers_a_duplicated_neuron_exactly():
    """Neuron 9 duplicates neuron 3: after removing 9 the refit moves its weight onto 3, losslessly."""
    from modelpress.sparsity.structured.scores import refit_columns

    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 10, generator=g, dtype=torch.float64)
    X[:, 9] = X[:, 3]
    W = torch.randn(6, 10, generator=g, dtype=torch.float64)
    keep = torch.arange(9)
    W2 = refit_columns(W, X.T @ X, keep, percdamp=1e-12)
    torch.testing.assert_close(X[:, keep] @ W2.T, X @ W.T)
    assert (X[:, keep] @ W[:, keep].T - X @ W.T).abs().max() > 0.1  # plain removal is not lossless


def test_reconstruct_brings_pruned_model_closer_to_dense():
    model = make_tiny_llama(seed=12)
    ref = logits(model)
    calib = torch.randint(0, 300, (16, 32), generator=torch.Generator().manual_seed(3))  # 512 tokens > 128 neurons
    errs = {}
    for rec in (False, True):
        lm = mp.load(copy.deepcopy(model))
        mp.apply(lm, {"stages": [{"method": "structured", "heads_fraction": 0.5, "mlp_fraction": 0.5,
                                  "reconstruct": rec}]}, calib=calib, progress=False)
        errs[rec] = float((logits(lm.module) - ref).pow(2).mean())
    assert errs[True] < 0.7 * errs[False]


def test_quantised_layers_are_refused_before_any_change(calib):
    lm = mp.load(make_tiny_llama(seed=13))
    mp.apply(lm, "rtn-w8", progress=False)
    msg = one_line_error(lambda: mp.apply(lm, "structured-25", calib=calib, progress=False))
    assert "before quantisation" in msg and "QuantLinear" in msg
    assert lm.module.config.num_attention_heads == 4
