"""Movement pruning (Sanh et al. 2020): the accumulated scores equal -sum_t W^(t) * dL/dW^(t) computed
independently with autograd from the recorded weights; hard movement keeps exactly the top-scored
weights; soft movement's scores get the straight-through gradient dL/dW' * W; the result saves and
reloads as ordinary SparseLayer pruning."""
from __future__ import annotations

import copy

import pytest
import torch

import modelpress as mp
from modelpress.core.errors import ModelpressError
from modelpress.distill.losses import hard_ce
from modelpress.distill.trainer import TrainConfig, TrainData, Trainer, sample_order
from modelpress.pipeline.recipe import parse_recipe
from modelpress.sparsity.algos.movement import MovementConfig, MovementLayer, MovementScores, SoftThreshold, top_v
from modelpress.sparsity.algos.gradual import sparse_layers
from modelpress.sparsity.layer import SparseLayer
from tests.conftest import make_tiny_llama


def ce_step(model, batch):
    out = model(input_ids=batch.input_ids)
    return hard_ce(out.logits, batch), int(batch.input_ids.numel())


def ids(n=16, length=16, seed=0):
    return torch.randint(3, 300, (n, length), generator=torch.Generator().manual_seed(seed))


class Recorder:
    """Records every parameter before each update and the scores just before each pruning step."""

    def __init__(self, inner: MovementScores, model) -> None:
        self.inner, self.model, self.params, self.scores_at = inner, model, [], {}

    def on_gradients(self, step, model):
        self.params.append({n: p.detach().clone() for n, p in self.model.named_parameters()})
        self.inner.on_gradients(step, model)

    def on_step(self, step, model, optimizer):
        if step in self.inner.when:
            self.scores_at[step] = ({n: s.clone() for n, s in self.inner.scores.items()},
                                    {n: m.mask.clone() for n, m in self.inner.layers.items()})
        self.inner.on_step(step, model, optimizer)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def _run(steps=12, sparsity=0.7, schedule=None):
    lm = mp.load(make_tiny_llama(seed=5, layers=1))
    cfg = MovementConfig(sparsity=sparsity, schedule=schedule or {"start": 0.5, "end": 1.0, "every": 6},
                         train={"steps": steps, "batch_size": 4, "lr": 5e-3})
    layers = sparse_layers(lm, cfg)
    hook = MovementScores(layers, cfg.schedule, sparsity, steps)
    rec = Recorder(hook, lm.module)
    data = TrainData(ids())
    Trainer(lm.module, ce_step, data, TrainConfig(steps=steps, batch_size=4, lr=5e-3, clip=0.5), hooks=rec,
            progress=False).train()
    return lm, layers, hook, rec, data


def test_scores_equal_the_hand_accumulated_minus_w_times_grad():
    lm, layers, hook, rec, data = _run()
    assert len(rec.params) == 12
    probe = copy.deepcopy(lm.module)
    names = {f"{n}.weight" for n in layers}
    want = {n: torch.zeros_like(layers[n].weight) for n in layers}
    for t, params in enumerate(rec.params):  # step t+1: W^(t) and the gradient of its batch, by autograd
        with torch.no_grad():
            for n, p in probe.named_parameters():
                p.copy_(params[n])
        for n, m in probe.named_modules():  # the masks in force during step t+1
            if isinstance(m, SparseLayer):
                m.mask = rec_mask(rec, t + 1, n, layers[n].mask)
        batch = data.batch(sample_order(len(data), t, 4, 0))
        loss = hard_ce(probe(input_ids=batch.input_ids).logits, batch)
        ws = [dict(probe.named_parameters())[k] for k in sorted(names)]
        grads = torch.autograd.grad(loss, ws)
        for k, w, g in zip(sorted(names), ws, grads):
            want[k.removesuffix(".weight")] -= w.detach() * g
    for n in layers:
        torch.testing.assert_close(hook.scores[n], want[n], rtol=1e-5, atol=1e-7)
        assert hook.scores[n].abs().sum() > 0


def rec_mask(rec: Recorder, step: int, name: str, final: torch.Tensor) -> torch.Tensor:
    """The mask a layer had while step ``step`` ran: the one recorded before the next pruning step."""
    later = [s for s in sorted(rec.scores_at) if s >= step]
    return rec.scores_at[later[0]][1][name] if later else final


def test_hard_movement_keeps_exactly_the_top_scored_weights():
    lm, layers, hook, rec, _ = _run()
    assert sorted(rec.scores_at) == [6, 12]  # t0 = 6 (sparsity 0: nothing pruned), then the final step
    scores, before = rec.scores_at[12]
    for n, m in layers.items():
        assert before[n].all()  # nothing was pruned before the last step
        k = m.mask.numel() - round(0.7 * m.mask.numel())
        top = torch.zeros(m.mask.numel(), dtype=torch.bool)
        top[scores[n].flatten().topk(k).indices] = True
        assert torch.equal(m.mask.flatten(), top), n
        assert not m.weight.detach()[~m.mask].any()


def test_soft_scores_get_the_straight_through_gradient():
    lin = torch.nn.Linear(6, 3)
    layer = MovementLayer(SparseLayer.from_module(lin, torch.ones(3, 6, dtype=torch.bool)), init=0.0, lr=0.05)
    layer.tau = 0.4
    x = torch.randn(5, 6)
    gy = torch.randn(5, 3)
    (layer(x) * gy).sum().backward()
    w = lin.weight.detach()
    g_w_eff = gy.t() @ x  # dL/dW' of y = x W'^T + b
    # dL/dS = dL/dW' * W, unscaled (mask all ones at sigmoid(0) = 0.5 > 0.4)
    torch.testing.assert_close(layer.score.grad, g_w_eff * w, rtol=1e-5, atol=1e-6)
    layer.tau = 0.6  # every score below the threshold: everything masked, output = bias
    torch.testing.assert_close(layer(x), lin.bias.detach().expand(5, 3))


def test_hard_learned_scores_get_the_straight_through_gradient_pruned_weights_included():
    """Sanh et al.'s hard movement: y = x (W * TopV(S))^T + b, dL/dS = dL/dW' * W for every weight, so the
    score of a weight the top-v mask drops still moves (and the weight can come back)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 4)
    layer = MovementLayer(SparseLayer.from_module(lin, torch.ones(4, 8, dtype=torch.bool)), init=0.0, lr=0.05,
                          rule="topv")
    with torch.no_grad():
        layer.score.copy_(torch.randn(4, 8))
    layer.sparsity = 0.5
    x, gy = torch.randn(5, 8), torch.randn(5, 4)
    (layer(x) * gy).sum().backward()
    w, s = lin.weight.detach(), layer.scores().detach()
    keep = s.flatten() > s.flatten().kthvalue(16).values  # above the 16th lowest: the 16 highest of 32
    assert torch.equal(layer.keep().flatten(), keep)
    torch.testing.assert_close(layer(x), x @ (w * keep.view(4, 8)).t() + lin.bias.detach())
    g_w_eff = gy.t() @ x
    torch.testing.assert_close(layer.score.grad, g_w_eff * w, rtol=1e-5, atol=1e-6)
    assert (layer.score.grad.flatten()[~keep] != 0).all()  # pruned weights' scores move too
    pruned = int((~keep).nonzero()[0])
    with torch.no_grad():  # its score climbs above every other: it comes back with its old value
        layer.score.view(-1)[pruned] = 100.0
    assert layer.keep().flatten()[pruned] and int(layer.keep().sum()) == 16


def test_churn_counts_the_kept_weights_a_step_swaps_out_not_the_schedule_tightening():
    """Learned masks can swap weights at every step; the hook reports which share of the kept weights
    each update dropped, at unchanged sparsity (a tighter schedule step is not churn)."""
    from modelpress.sparsity.algos.gradual import CubicSchedule

    lin = torch.nn.Linear(10, 4)
    layer = MovementLayer(SparseLayer.from_module(lin, torch.ones(4, 10, dtype=torch.bool)), 0.0, 0.01, "topv")
    with torch.no_grad():
        layer.score.copy_(torch.arange(40, dtype=torch.float32).view(4, 10))
    hook = SoftThreshold({"l": layer}, CubicSchedule(start=0.0, end=0.5, every=1), 0.1, total=10,
                         final_sparsity=0.5)
    for step in range(1, 11):
        with torch.no_grad():
            if step == 7:  # at the final 50%: the three lowest scores jump above the rest
                layer.score.view(-1)[:3] += 100.0
        hook.on_step(step, None, None)
    churn = dict(hook.churn)
    assert churn[7] == pytest.approx(3 / 20)  # 3 of the 20 kept swapped out
    assert all(c == 0.0 for s, c in churn.items() if s != 7)  # tightening (steps 1-5) drops none by churn
    assert hook.churn_summary()["mask_churn_at_final"] == pytest.approx(3 / 20 / 5)  # steps 6..10 at 50%


def test_top_v_keeps_exactly_the_highest_per_layer_or_per_row():
    s = torch.randn(6, 10, generator=torch.Generator().manual_seed(1))
    for sparsity in (0.0, 0.3, 0.9, 1.0):
        m = top_v(s, sparsity)
        assert int(m.sum()) == 60 - round(sparsity * 60)
        if 0 < int(m.sum()) < 60:
            assert s[m].min() > s[~m].max()
        r = top_v(s, sparsity, per_output=True)
        assert (r.sum(1) == 10 - round(sparsity * 10)).all()
        for i in range(6):
            if 0 < int(r[i].sum()) < 10:
                assert s[i][r[i]].min() > s[i][~r[i]].max()


@pytest.mark.parametrize("variant", ["hard", "hard-learned", "soft"])
def test_stage_result_is_sparse_layer_pruning_that_saves_and_reloads(tmp_path, variant):
    lm = mp.load(make_tiny_llama(seed=6, layers=1))
    stage = {"method": "movement", "variant": variant.split("-")[0], "sparsity": 0.6, "losses": [{"type": "ce"}],
             "schedule": {"start": 0.25, "every": 2}, "regularization": 50.0, "score_lr": 0.5,
             "train": {"steps": 8, "batch_size": 4, "lr": 1e-3}}
    if variant == "hard-learned":
        stage["scores"] = "learned"
    mp.compress(lm, {"stages": [stage]}, calib=ids(), progress=False)
    sparse = [m for m in lm.module.modules() if isinstance(m, SparseLayer)]
    assert len(sparse) == 7 and not any(isinstance(m, MovementLayer) for m in lm.module.modules())
    if variant.startswith("hard"):
        assert all(int((~m.mask).sum()) == round(0.6 * m.mask.numel()) for m in sparse)
    else:  # the penalty pushed some scores under the threshold
        assert sum(int((~m.mask).sum()) for m in sparse) > 0
    back = mp.load(mp.save(lm, tmp_path / "out"))
    x = ids(2, 8, seed=9)
    with torch.no_grad():
        assert torch.equal(lm.module(input_ids=x).logits, back.module(input_ids=x).logits)


@pytest.mark.parametrize("stage, needle", [
    ({"sparsity": 0.5, "schedule": {"initial": 0.6, "start": 0.1}}, "above the final sparsity"),
    ({"schedule": {"initial": 0.2}}, "scores not yet accumulated"),
    ({"variant": "soft", "pattern": "8x8", "sparsity": 0.5}, "unstructured"),
    ({"threshold": 1.5}, "threshold"),
    ({"scores": "learned", "scope": "global"}, "layer scope only"),
    ({"scores": "learned", "pattern": "2:4", "sparsity": 0.5}, "unstructured"),
])
def test_bad_movement_configs_are_refused_at_load(stage, needle):
    with pytest.raises(ModelpressError, match="stages\\[0\\]") as e:
        parse_recipe({"stages": [{"method": "movement", **stage}]})
    assert needle in str(e.value)


# ---- the paper's claim where it holds: transfer to a task the large weights do not serve ----------
def _transfer_run(rule: str, steps: int = 480) -> tuple[torch.Tensor, float]:
    """A 'pretrained' 64 -> 4 linear layer whose large weights (inputs 0-31) serve an old task; the new
    target reads only inputs 32-39, whose weights start near zero. Train at a rate too low for the large
    weights to shrink below the growing ones before pruning (as fine-tuning's 3e-5 is), keeping 8 of 64
    weights per row. Returns (kept mask, final MSE)."""
    from modelpress.sparsity.algos.gradual import CubicSchedule, ScheduledMasks, magnitude_score

    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(4, 64, generator=g).sign() * (0.5 + 0.5 * torch.rand(4, 64, generator=g))
    w0[:, 32:] = 0.01 * torch.randn(4, 32, generator=g)
    target = torch.zeros(4, 64)
    target[:, 32:40] = torch.randn(4, 8, generator=g).sign() * 0.3
    x = torch.randn(512, 64, generator=g)
    y = x @ target.t()
    layer = SparseLayer(w0.clone(), torch.ones(4, 64, dtype=torch.bool), None)
    schedule = CubicSchedule(start=0.2, end=0.7, every=1)
    if rule == "learned":
        wrapped = MovementLayer(layer, 0.0, 1e-2, "topv", per_output=True)
        model, hooks = torch.nn.Sequential(wrapped), SoftThreshold({"l": wrapped}, schedule, 0.1, steps, 0.875)
    else:
        score = {"magnitude": magnitude_score}.get(rule)
        hooks = (ScheduledMasks({"l": layer}, schedule, 0.875, steps, score, per_output=True) if score else
                 MovementScores({"l": layer}, schedule, 0.875, steps, per_output=True))
        model = torch.nn.Sequential(layer)

    def step(m, batch):
        i = batch.input_ids[:, 0]
        return torch.nn.functional.mse_loss(m(x[i]), y[i]), len(i)

    Trainer(model, step, TrainData(torch.arange(512)[:, None]),
            TrainConfig(steps=steps, batch_size=32, lr=1e-3, warmup=0.0, schedule="constant", clip=None),
            hooks=hooks, progress=False).train()
    keep = wrapped.keep() if rule == "learned" else layer.mask
    with torch.no_grad():
        w = layer.weight * keep
    return keep, float(torch.nn.functional.mse_loss(x @ w.t(), y))


@pytest.mark.parametrize("rule", ["learned", "accumulated"])
def test_movement_finds_the_new_tasks_weights_where_magnitude_keeps_the_old_ones(rule):
    """Sanh et al.'s argument in a case small enough to check: magnitude keeps what pretraining made
    large, movement keeps what the new task grows. Both keep 8 of 64 weights per row; the new task's
    32 weights are known."""
    support = torch.zeros(4, 64, dtype=torch.bool)
    support[:, 32:40] = True
    mv_keep, mv_mse = _transfer_run(rule)
    mag_keep, mag_mse = _transfer_run("magnitude")
    assert int(mv_keep.sum()) == int(mag_keep.sum()) == 32
    assert int((mv_keep & support).sum()) >= 30, int((mv_keep & support).sum())
    assert int((mag_keep & support).sum()) <= 4
    assert mv_mse < 0.1 * mag_mse, (mv_mse, mag_mse)
