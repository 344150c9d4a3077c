"""MoE: usage statistics against a brute-force count of the router's top-k; pruning an unused expert
changes nothing and reloads with plain transformers; merging identical experts changes nothing;
unused experts are reported; usage-weighted merging checked by hand."""
import pytest
import torch

import modelpress as mp
from modelpress.core.errors import ModelpressError
from modelpress.export.saving import load_compressed
from modelpress.sparsity.moe import RemappedRouter, cluster_experts, merge_stacked, merge_weights
from modelpress.sparsity.moe.method import expert_usage

E, TOP_K, UNUSED = 6, 2, 5


def make_tiny_mixtral(seed: int = 0):
    """Mixtral-shaped, 2 blocks of 6 experts (top-2); expert 5 can never be chosen (see below)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=E,
                        num_experts_per_tok=TOP_K, max_position_embeddings=128, tie_word_embeddings=False)
    model = MixtralForCausalLM(cfg).eval()
    model.config.architectures = ["MixtralForCausalLM"]  # as a hub checkpoint's config says
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.mlp.gate.weight  # (E, d)
            w.normal_(0, 1.0)
            # rows a, -a and c, -c: each pair has a logit >= 0 for every token, so two experts always
            # beat expert 5 whose row is zero (logit 0): it never enters the top-2
            w[1], w[3], w[UNUSED] = -w[0], -w[2], 0.0
            layer.mlp.experts.gate_up_proj.normal_(0, 0.2)
            layer.mlp.experts.down_proj.normal_(0, 0.2)
    return model


CALIB = torch.randint(0, 300, (6, 32), generator=torch.Generator().manual_seed(1))


def _lm(model=None):
    lm = mp.load(model if model is not None else make_tiny_mixtral())
    assert lm.spec is not None and lm.spec.name == "mixtral"
    return lm


def _recipe(**stage):
    return {"name": "moe", "stages": [stage]}


def test_usage_equals_brute_force_top_k_count():
    lm = _lm()
    stats = expert_usage(lm, CALIB)
    # brute force: the hidden states entering each MoE block, the router maths by hand
    seen = {i: [] for i in range(2)}
    hooks = [layer.mlp.register_forward_pre_hook(lambda _m, a, i=i: seen[i].append(a[0].reshape(-1, 32)))
             for i, layer in enumerate(lm.module.model.layers)]
    with torch.no_grad():
        for row in CALIB:
            lm.module(input_ids=row[None])
    for h in hooks:
        h.remove()
    for i, layer in enumerate(lm.module.model.layers):
        x = torch.cat(seen[i]).double()
        probs = torch.softmax(x @ layer.mlp.gate.weight.double().T, -1)
        top, idx = probs.topk(TOP_K, -1)
        w = top / top.sum(-1, keepdim=True)
        counts = [int((idx == e).sum()) for e in range(E)]
        mean_w = [float(w[idx == e].detach().mean()) if counts[e] else 0.0 for e in range(E)]
        assert stats[i].tokens.tolist() == counts
        assert torch.allclose(stats[i].mean_weight, torch.tensor(mean_w, dtype=torch.float64), atol=1e-5)
        assert stats[i].n_tokens == CALIB.numel() and sum(counts) == TOP_K * CALIB.numel()
        assert stats[i].unused() == [UNUSED]


def test_pruning_an_unused_expert_leaves_outputs_unchanged_and_reloads_with_transformers(tmp_path):
    from transformers import MixtralForCausalLM

    lm = _lm()
    ids = CALIB[:2]
    before = lm.module(input_ids=ids).logits
    rep = mp.compress(lm, _recipe(method="moe-prune", keep=E - 1), calib=CALIB, progress=False)
    assert lm.module.config.num_local_experts == E - 1
    assert all(layer.mlp.experts.gate_up_proj.shape[0] == E - 1 for layer in lm.module.model.layers)
    assert any("dropped experts=[5]" in n for r in rep["layers"] for n in r["notes"])
    after = lm.module(input_ids=ids).logits
    assert torch.allclose(before, after, atol=1e-5, rtol=0)
    out = mp.save(lm, tmp_path / "pruned", recipe=_recipe(method="moe-prune", keep=E - 1))
    plain = MixtralForCausalLM.from_pretrained(str(out)).eval()
    assert plain.config.num_local_experts == E - 1
    assert torch.equal(plain(input_ids=ids).logits, after)


def test_pruning_used_experts_reports_lost_routing():
    lm = _lm()
    rep = mp.compress(lm, _recipe(method="moe-prune", keep=3), calib=CALIB, progress=False)
    assert lm.module.config.num_local_experts == 3
    lost = [n for r in rep["layers"] for n in r["notes"] if n.startswith("routed token slots lost=")]
    assert lost and all(not n.startswith("routed token slots lost=0/") for n in lost)
    lm.module(input_ids=CALIB[:1])  # still runs


def test_unused_experts_are_reported():
    lm = _lm()
    rep = mp.compress(lm, _recipe(method="moe-merge", keep=4), calib=CALIB, progress=False)
    assert any("experts [5] received no calibration tokens" in w and "model.layers.0" in w for w in rep["warnings"])
    assert all(any(n == "unused experts=[5]" for n in r["notes"]) for r in rep["layers"])


def test_merging_two_identical_experts_leaves_outputs_unchanged(tmp_path):
    model = make_tiny_mixtral()
    with torch.no_grad():
        for layer in model.model.layers:  # experts 2 and 4 compute the same function
            layer.mlp.experts.gate_up_proj[4] = layer.mlp.experts.gate_up_proj[2]
            layer.mlp.experts.down_proj[4] = layer.mlp.experts.down_proj[2]
    lm = _lm(model)
    ids = CALIB[:2]
    before = lm.module(input_ids=ids).logits
    rep = mp.compress(lm, _recipe(method="moe-merge", keep=E - 1), calib=CALIB, progress=False)
    assert all("groups=[[0], [1], [2, 4], [3], [5]]" in r["notes"] for r in rep["layers"])
    assert isinstance(lm.module.model.layers[0].mlp.gate, RemappedRouter)
    assert lm.module.model.layers[0].mlp.experts.gate_up_proj.shape[0] == E - 1
    after = lm.module(input_ids=ids).logits
    assert torch.allclose(before, after, atol=1e-5, rtol=0)
    back = load_compressed(mp.save(lm, tmp_path / "merged", recipe=_recipe(method="moe-merge", keep=E - 1)))
    assert torch.equal(back.module(input_ids=ids).logits, after)


def test_folded_router_reloads_with_plain_transformers(tmp_path):
    from transformers import MixtralForCausalLM

    lm = _lm()
    rep = mp.compress(lm, _recipe(method="moe-merge", keep=3, router="fold"), calib=CALIB, progress=False)
    assert all(any(n.startswith("routing agreement=") for n in r["notes"]) for r in rep["layers"])
    assert lm.module.model.layers[1].mlp.gate.weight.shape == (3, 32)
    out = mp.save(lm, tmp_path / "folded", recipe=_recipe(method="moe-merge", keep=3, router="fold"))
    plain = MixtralForCausalLM.from_pretrained(str(out)).eval()
    assert torch.equal(plain(input_ids=CALIB[:2]).logits, lm.module(input_ids=CALIB[:2]).logits)


def test_usage_weighted_merge_by_hand():
    p = torch.arange(4 * 2 * 3, dtype=torch.float32).reshape(4, 2, 3)  # 4 experts
    usage = torch.tensor([30, 10, 0, 0])
    c01, uniform01 = merge_weights(usage, [0, 1])
    c23, uniform23 = merge_weights(usage, [2, 3])
    assert c01.tolist() == [0.75, 0.25] and not uniform01
    assert c23.tolist() == [0.5, 0.5] and uniform23  # no usage at all: uniform, and flagged
    merged = merge_stacked(p, [[0, 1], [2, 3]], [c01, c23])
    assert torch.allclose(merged[0], 0.75 * p[0] + 0.25 * p[1])
    assert torch.allclose(merged[1], 0.5 * p[2] + 0.5 * p[3])


def test_clustering_joins_the_most_similar_first():
    sim = torch.tensor([[1.0, 0.9, 0.1, 0.0], [0.9, 1.0, 0.2, 0.1], [0.1, 0.2, 1.0, 0.5], [0.0, 0.1, 0.5, 1.0]])
    assert cluster_experts(sim, 3) == [[0, 1], [2], [3]]
    assert cluster_experts(sim, 2) == [[0, 1], [2, 3]]


def test_bad_requests_are_refused():
    with pytest.raises(ModelpressError, match="top-k"):
        mp.compress(_lm(), _recipe(method="moe-prune", keep=1), calib=CALIB, progress=False)
    with pytest.raises(ModelpressError, match="every MoE layer"):
        mp.compress(_lm(), _recipe(method="moe-merge", keep=4, targets=["model.layers.0.mlp.gate"]), calib=CALIB,
                    progress=False)
    from tests.conftest import make_tiny_llama

    with pytest.raises(ModelpressError, match="mixture-of-experts"):
        mp.compress(mp.load(make_tiny_llama()), _recipe(method="moe-prune", keep=2), calib=CALIB, progress=False)
