"""Each distillation loss equals a hand computation; gradients reach the student only."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from modelpress.core.errors import ModelpressError
from modelpress.distill.losses import (Batch, Outputs, mixed_loss, uniform_layer_map)


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def _softmax(z: list[float], T: float = 1.0) -> list[float]:
    e = [math.exp(v / T) for v in z]
    return [v / sum(e) for v in e]


ZT = [[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]]  # teacher logits at 2 positions, vocab 3
ZS = [[1.0, 1.0, 0.0], [0.5, -0.5, 1.5]]
IDS = [[0, 2, 1]]  # position 0 predicts 2, position 1 predicts 1, position 2 has no target


def _outputs(z: list[list[float]]) -> Outputs:
    logits = torch.tensor([z + [[0.0, 0.0, 0.0]]])  # (1, 3, 3): the last position has no target
    return Outputs(logits=logits)


@pytest.mark.parametrize("T, alpha", [(1.0, 1.0), (2.0, 0.5), (4.0, 0.0)])
def test_kd_forward_kl_with_temperature_and_hard_labels(T, alpha):
    batch = Batch(torch.tensor(IDS))
    got = float(mixed_loss([{"type": "kd", "temperature": T, "alpha": alpha}])(_outputs(ZS), _outputs(ZT), batch))
    soft = sum(_kl(_softmax(t, T), _softmax(s, T)) for t, s in zip(ZT, ZS)) / 2
    ce = (-math.log(_softmax(ZS[0])[2]) - math.log(_softmax(ZS[1])[1])) / 2
    assert got == pytest.approx(alpha * T * T * soft + (1 - alpha) * ce, rel=1e-5)


def test_reverse_kl_and_generalised_jsd():
    batch = Batch(torch.tensor(IDS))
    p = [_softmax(t) for t in ZT]
    q = [_softmax(s) for s in ZS]
    rev = float(mixed_loss([{"type": "kd", "temperature": 1.0, "alpha": 1.0, "divergence": "reverse"}])(
        _outputs(ZS), _outputs(ZT), batch))
    assert rev == pytest.approx(sum(_kl(b, a) for a, b in zip(p, q)) / 2, rel=1e-5)
    beta = 0.3
    jsd = float(mixed_loss([{"type": "kd", "temperature": 1.0, "alpha": 1.0, "divergence": "jsd", "beta": beta}])(
        _outputs(ZS), _outputs(ZT), batch))
    want = 0.0
    for a, b in zip(p, q):
        m = [beta * x + (1 - beta) * y for x, y in zip(a, b)]
        want += beta * _kl(a, m) + (1 - beta) * _kl(b, m)
    assert jsd == pytest.approx(want / 2, rel=1e-5)


def test_kd_from_a_cached_top_k_teacher():
    """DistillKit's sparse form: teacher renormalised over its k tokens, student gathered there."""
    batch = Batch(torch.tensor(IDS))
    t = _outputs(ZT)
    vals, idx = t.logits.topk(2, dim=-1)
    got = float(mixed_loss([{"type": "kd", "temperature": 1.0, "alpha": 1.0}])(
        _outputs(ZS), Outputs(topk_values=vals, topk_indices=idx), batch))
    want = 0.0
    for pos in range(2):
        ks = idx[0, pos].tolist()
        want += _kl(_softmax([ZT[pos][k] for k in ks]), _softmax([ZS[pos][k] for k in ks]))
    assert got == pytest.approx(want / 2, rel=1e-5)
    full = float(mixed_loss([{"type": "kd", "temperature": 1.0, "alpha": 1.0}])(
        _outputs(ZS), Outputs(logits=t.logits.clone()), batch))
    assert full != pytest.approx(got)  # (top-2 of 3 is not the full distribution)


def test_hidden_state_mse_cosine_and_projection():
    hs = (torch.tensor([[[1.0, 0.0], [0.0, 2.0]]]), torch.tensor([[[1.0, 1.0], [2.0, 0.0]]]))
    ht = (torch.tensor([[[0.0, 0.0], [0.0, 0.0]]]), torch.tensor([[[1.0, 3.0], [2.0, 2.0]]]))
    batch = Batch(torch.zeros(1, 2, dtype=torch.long))
    hidden = float(mixed_loss([{"type": "hidden"}])(Outputs(hidden_states=hs), Outputs(hidden_states=ht), batch))
    want = ((1 + 0) / 2 + (0 + 4) / 2) / 2 / 2 + ((0 + 4) / 2 + (0 + 4) / 2) / 2 / 2  # two pairs, mean
    assert hidden == pytest.approx(want)
    cos = float(mixed_loss([{"type": "cosine"}])(Outputs(hidden_states=hs), Outputs(hidden_states=ht), batch))
    c1 = (1 * 1 + 1 * 3) / (math.sqrt(2) * math.sqrt(10))
    c2 = (2 * 2 + 0 * 2) / (2 * math.sqrt(8))
    assert cos == pytest.approx(((1 - c1) + (1 - c2)) / 2, rel=1e-6)
    loss = mixed_loss([{"type": "hidden"}], {"hidden": 2}, {"hidden": 4})
    assert isinstance(loss.losses[0].extra["proj"], nn.Linear) and loss.losses[0].extra["proj"].weight.shape == (4, 2)


def test_layer_maps():
    assert uniform_layer_map(3, 6) == {0: 0, 1: 2, 2: 4, 3: 6}
    hs = tuple(torch.zeros(1, 2, 2) for _ in range(3))
    with pytest.raises(ModelpressError, match="does not exist"):
        mixed_loss([{"type": "hidden", "layer_map": {1: 9}}])(Outputs(hidden_states=hs), Outputs(hidden_states=hs),
                                                               Batch(torch.zeros(1, 2, dtype=torch.long)))


def test_attention_map_mse():
    sa = (torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]]),)  # (1, 1 head, 2, 2)
    ta = (torch.tensor([[[[0.5, 0.5], [0.0, 1.0]]]]),)
    got = float(mixed_loss([{"type": "attention", "layer_map": {1: 1}}])(
        Outputs(attentions=sa), Outputs(attentions=ta), Batch(torch.zeros(1, 2, dtype=torch.long))))
    assert got == pytest.approx(((0.25 + 0.25) + (0.25 + 0.25)) / 2)


def test_rkd_distance_and_angle():
    es = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    et = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    batch = Batch(torch.zeros(3, 1, dtype=torch.long))
    got = float(mixed_loss([{"type": "rkd-distance"}])(Outputs(embeddings=es), Outputs(embeddings=et), batch))

    def norm_d(e):
        d = {(i, j): float((e[i] - e[j]).norm()) for i in range(3) for j in range(3) if i != j}
        mu = sum(d.values()) / len(d)
        return {k: v / mu for k, v in d.items()}

    ds, dt = norm_d(es), norm_d(et)
    huber = lambda x: 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5  # noqa: E731
    assert got == pytest.approx(sum(huber(ds[k] - dt[k]) for k in ds) / len(ds), rel=1e-5)
    same = float(mixed_loss([{"type": "rkd-angle"}])(Outputs(embeddings=es), Outputs(embeddings=es * 3), batch))
    assert same == pytest.approx(0.0, abs=1e-7)  # angles ignore scale
    diff = float(mixed_loss([{"type": "rkd-angle"}])(Outputs(embeddings=es), Outputs(embeddings=et), batch))
    assert diff > 1e-4


def test_embedding_mse_pools_real_tokens_only():
    hs = torch.tensor([[[1.0, 1.0], [3.0, 3.0], [100.0, 100.0]]])  # the third token is padding
    ht = torch.tensor([[[2.0, 2.0], [2.0, 2.0], [-50.0, 0.0]]])
    batch = Batch(torch.zeros(1, 3, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 0]]))
    got = float(mixed_loss([{"type": "embedding-mse"}])(Outputs(hidden_states=(hs,)), Outputs(hidden_states=(ht,)), batch))
    assert got == pytest.approx(0.0)


def test_mixed_weights_and_bad_configs():
    batch = Batch(torch.tensor(IDS))
    a = float(mixed_loss([{"type": "ce"}])(_outputs(ZS), _outputs(ZT), batch))
    b = float(mixed_loss([{"type": "kd", "alpha": 1.0, "temperature": 1.0}])(_outputs(ZS), _outputs(ZT), batch))
    mix = float(mixed_loss([{"type": "ce", "weight": 0.25}, {"type": "kd", "alpha": 1.0, "temperature": 1.0,
                                                            "weight": 2.0}])(_outputs(ZS), _outputs(ZT), batch))
    assert mix == pytest.approx(0.25 * a + 2 * b, rel=1e-6)
    for bad in ({"type": "kd", "temperature": 0}, {"type": "kd", "alpha": 1.5}, {"type": "kd", "temperature": -1}):
        with pytest.raises(ValueError):
            mixed_loss([bad])


def test_gradients_flow_into_the_student_only():
    s_logits = torch.tensor([ZS + [[0.0, 0.0, 0.0]]], requires_grad=True)
    t_logits = torch.tensor([ZT + [[0.0, 0.0, 0.0]]], requires_grad=True)
    loss = mixed_loss([{"type": "kd", "temperature": 2.0, "alpha": 0.5}])
    loss(Outputs(logits=s_logits), Outputs(logits=t_logits.detach()), Batch(torch.tensor(IDS))).backward()
    assert s_logits.grad is not None and s_logits.grad.abs().sum() > 0
    assert t_logits.grad is None
