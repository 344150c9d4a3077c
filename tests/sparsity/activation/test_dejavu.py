"""Deja Vu: an oracle selector reproduces the dense MLP exactly; the learned predictor beats chance;
skipped work and predictor cost counted by hand; recipe, evaluation and save/reload."""
import copy

import pytest
import torch

import modelpress as mp
from modelpress.eval.perplexity import perplexity
from modelpress.export.saving import load_compressed
from modelpress.sparsity.activation import DejaVuMLP, OracleActive, measure_mlp
from modelpress.sparsity.activation.dejavu import neuron_scores, recall, topk_mask, train_predictor
from tests.conftest import make_tiny_llama


def _wrap(mlp, k: int, rank: int = 4) -> DejaVuMLP:
    d, inter = mlp.up_proj.in_features, mlp.up_proj.out_features
    return DejaVuMLP(mlp.gate_proj, mlp.up_proj, mlp.down_proj, "relu", torch.randn(rank, d), torch.randn(inter, rank), k)


def test_oracle_of_active_neurons_equals_dense_exactly():
    """ReLU-gated MLP: neurons with zero activation contribute nothing, so computing only the others is exact."""
    model = make_tiny_llama(seed=1)
    model.config.hidden_act = "relu"
    from transformers.activations import ACT2FN

    mlp = model.model.layers[0].mlp
    mlp.act_fn = ACT2FN["relu"]
    x = torch.randn(2, 9, 64)
    dense = mlp(x)
    sparse = _wrap(copy.deepcopy(mlp), k=128)
    sparse.selector = OracleActive()
    assert torch.equal(sparse(x), dense)  # batch path: masked neurons were exactly zero already
    assert sparse.neurons and 1 - sparse.selected / sparse.neurons > 0.3  # and there were many to skip
    for tok in x.reshape(-1, 64):  # decode path: only the selected rows/columns are read
        assert torch.allclose(sparse(tok[None]), mlp(tok[None]), atol=1e-6, rtol=0)


def test_skipped_and_overhead_macs_by_hand():
    mlp = make_tiny_llama(layers=1, hidden=8, inter=16).model.layers[0].mlp
    sparse = _wrap(mlp, k=6, rank=4)
    sparse(torch.randn(5, 8))
    per_neuron = 8 + 8 + 8  # gate row, up row, down column
    assert sparse.skipped_macs == 5 * (16 - 6) * per_neuron
    assert sparse.dense_macs == 5 * 16 * per_neuron
    assert sparse.overhead_macs == 5 * 4 * (8 + 16)  # W1 (4, 8) and W2 (16, 4) per token


def test_recall_by_hand():
    true = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    pred = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 0]], dtype=torch.bool)
    assert recall(pred, true) == 3 / 4


def test_trained_predictor_learns_a_learnable_activation_pattern():
    """ReLU MLP without gate: the top-k of relu(W x) is the top-k of W x, which W2 relu(W1 x) can represent."""
    torch.manual_seed(0)
    W, x = torch.randn(128, 64), torch.randn(6000, 64)
    labels = topk_mask(torch.relu(x @ W.T), 32)  # k = 25% of 128
    w1, w2 = train_predictor(x[:5000], labels[:5000], rank=128, epochs=6, lr=1e-2)
    pred = topk_mask(torch.relu(x[5000:] @ w1.T) @ w2.T, 32)
    assert recall(pred, labels[5000:]) > 0.75  # chance is k / I = 0.25


@pytest.fixture(scope="module")
def dejavu_lm():
    lm = mp.load(make_tiny_llama(seed=0))
    calib = torch.randint(0, 300, (16, 64), generator=torch.Generator().manual_seed(1))
    rep = mp.compress(lm, {"name": "dv", "stages": [{"method": "dejavu", "sparsity": 0.5, "rank": 16}]},
                      calib=calib, progress=False)
    return lm, rep


def test_recipe_wraps_every_mlp_and_reports_recall(dejavu_lm):
    lm, rep = dejavu_lm
    assert all(isinstance(b.mlp, DejaVuMLP) for b in lm.module.model.layers)
    assert [r["name"] for r in rep["layers"]] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(any(n.startswith("held-out recall=") for n in r["notes"]) for r in rep["layers"])
    with measure_mlp(lm) as r:
        perplexity(lm.module, torch.randint(0, 300, (512,)), 128)
    assert r.neuron_sparsity == pytest.approx(0.5)
    assert r.skipped_fraction == pytest.approx(0.5) and r.net_fraction < 0.5


def test_save_and_reload_gives_same_logits(dejavu_lm, tmp_path):
    lm, _ = dejavu_lm
    ids = torch.randint(0, 300, (1, 40))
    before = lm.module(input_ids=ids).logits
    back = load_compressed(mp.save(lm, tmp_path / "dv", recipe={"name": "dv", "stages": [{"method": "dejavu"}]}))
    assert isinstance(back.module.model.layers[1].mlp, DejaVuMLP)
    assert torch.equal(before, back.module(input_ids=ids).logits)
