"""Gradual magnitude pruning (Zhu & Gupta): the cubic schedule against its formula at every step,
masks that hold exactly the scheduled sparsity after every optimizer step, pruned weights and their
AdamW moments exactly zero, global scope, and bad schedules refused at recipe load."""
from __future__ import annotations

import pytest
import torch

import modelpress as mp
from modelpress.core.errors import ModelpressError
from modelpress.distill.losses import hard_ce
from modelpress.distill.trainer import TrainConfig, TrainData, Trainer
from modelpress.pipeline.recipe import parse_recipe
from modelpress.sparsity.algos.gradual import CubicSchedule, GradualConfig, ScheduledMasks, magnitude_score, sparse_layers
from modelpress.sparsity.layer import SparseLayer
from tests.conftest import make_tiny_llama


def ce_step(model, batch):
    out = model(input_ids=batch.input_ids)
    return hard_ce(out.logits, batch), int(batch.input_ids.numel())


def ids(n=16, length=16, seed=0):
    return torch.randint(3, 300, (n, length), generator=torch.Generator().manual_seed(seed))


def test_cubic_schedule_follows_the_formula_at_every_step():
    sch = CubicSchedule(initial=0.1, start=0.1, end=0.8, every=7)
    total, s_f = 100, 0.9
    t0, dt, n = 10, 7, 10  # by hand: t0 = 0.1 * 100, window 70 steps = 10 pruning intervals of 7
    assert sch.steps(total) == (t0, dt, n)
    assert sch.prune_steps(total) == list(range(10, 81, 7))
    for t in range(total + 1):
        if t < t0:
            want = 0.0
        else:
            last = t0 + min(n, (t - t0) // dt) * dt  # the masks hold the last pruning step's sparsity
            want = s_f + (0.1 - s_f) * (1 - (last - t0) / (n * dt)) ** 3
        assert sch.sparsity_at(t, total, s_f) == pytest.approx(want, abs=1e-12), t
    # hand values: the start, the middle (frac 1/2: 0.9 - 0.8 / 8), the end and after it
    assert sch.sparsity_at(10, total, s_f) == pytest.approx(0.1)
    assert sch.sparsity_at(45, total, s_f) == pytest.approx(0.8)
    assert sch.sparsity_at(46, total, s_f) == pytest.approx(0.8)
    assert sch.sparsity_at(80, total, s_f) == pytest.approx(0.9) and sch.sparsity_at(100, total, s_f) == pytest.approx(0.9)


def test_short_run_still_reaches_the_final_sparsity():
    sch = CubicSchedule(every=50)  # a window shorter than one interval: dt shrinks to fit
    assert sch.prune_steps(4)[-1] <= 4 and sch.sparsity_at(4, 4, 0.9) == pytest.approx(0.9)


class Spy:
    """Wraps the schedule hook; after each step checks what the masks and the optimizer hold."""

    def __init__(self, inner: ScheduledMasks, total_zeros) -> None:
        self.inner, self.total_zeros, self.seen = inner, total_zeros, []
        self.prev = {n: m.mask.clone() for n, m in inner.layers.items()}

    def on_gradients(self, step, model):
        self.inner.on_gradients(step, model)

    def on_step(self, step, model, optimizer):
        self.inner.on_step(step, model, optimizer)
        s = self.inner.schedule.sparsity_at(step, self.inner.total, self.inner.final)
        self.total_zeros(self.inner.layers, s, step)
        for n, m in self.inner.layers.items():
            assert not (m.mask & ~self.prev[n]).any(), f"{n}: a pruned weight came back at step {step}"
            self.prev[n] = m.mask.clone()
            assert torch.equal(m.weight.detach()[~m.mask], torch.zeros(int((~m.mask).sum()))), (n, step)
            for k, v in optimizer.optimizer.state[m.weight].items():
                if torch.is_tensor(v) and v.shape == m.weight.shape:
                    assert not v[~m.mask].any(), f"{n}: AdamW {k} nonzero at a pruned weight (step {step})"
        self.seen.append(step)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def _train_with(scope: str, check) -> list[int]:
    lm = mp.load(make_tiny_llama(seed=3, layers=2))
    cfg = GradualConfig(sparsity=0.85, scope=scope, schedule={"initial": 0.2, "start": 0.1, "end": 0.7, "every": 3},
                        train={"steps": 30, "batch_size": 4, "lr": 1e-2})
    layers = sparse_layers(lm, cfg)
    hook = ScheduledMasks(layers, cfg.schedule, 0.85, 30, magnitude_score, scope=scope)
    spy = Spy(hook, check)
    Trainer(lm.module, ce_step, TrainData(ids()), TrainConfig(steps=30, batch_size=4, lr=1e-2, weight_decay=0.1),
            hooks=spy, progress=False).train()
    assert spy.seen == list(range(1, 31))
    return sorted(hook.when)


def test_masks_hold_the_scheduled_sparsity_after_every_step_and_pruned_weights_stay_zero():
    def per_layer(layers, s, step):
        for n, m in layers.items():  # layer scope: exactly round(s * numel) zeros in each layer
            assert int((~m.mask).sum()) == round(s * m.mask.numel()), (n, step, s)
            assert int((m.effective_weight() == 0).sum()) >= round(s * m.mask.numel())

    assert _train_with("layer", per_layer) == [3, 6, 9, 12, 15, 18, 21]


def test_global_scope_holds_the_sparsity_over_all_layers():
    def overall(layers, s, step):
        zeros = sum(int((~m.mask).sum()) for m in layers.values())
        total = sum(m.mask.numel() for m in layers.values())
        assert zeros == round(s * total), (step, s)

    _train_with("global", overall)


def test_layer_scope_prunes_the_smallest_magnitudes():
    """At a pruning step the pruned set is the smallest |W| among the still-kept weights."""
    lin = torch.nn.Linear(16, 8)
    layer = SparseLayer.from_module(lin, torch.ones(8, 16, dtype=torch.bool))
    sch = CubicSchedule(initial=0.0, start=0.0, end=1.0, every=1)
    hook = ScheduledMasks({"l": layer}, sch, 0.5, 1, magnitude_score)
    w = layer.weight.detach().clone()
    hook.on_step(1, None, None)
    order = w.abs().flatten().argsort()
    assert set((~layer.mask).flatten().nonzero().flatten().tolist()) == set(order[:64].tolist())


def test_stage_prunes_to_the_final_sparsity_and_saves_as_magnitude_pruning(tmp_path):
    lm = mp.load(make_tiny_llama(seed=4, layers=2))
    rep = mp.compress(lm, {"stages": [{"method": "gradual", "sparsity": 0.75, "losses": [{"type": "ce"}],
                                       "schedule": {"every": 2}, "train": {"steps": 8, "batch_size": 4, "lr": 1e-3}}]},
                      calib=ids(), progress=False)
    sparse = {n: m for n, m in lm.module.named_modules() if isinstance(m, SparseLayer)}
    assert len(sparse) == 14 and all(int((~m.mask).sum()) == round(0.75 * m.mask.numel()) for m in sparse.values())
    assert rep["stages"][0]["metrics"][0]["steps"] == 8
    back = mp.load(mp.save(lm, tmp_path / "out"))
    x = ids(2, 8, seed=9)
    with torch.no_grad():
        assert torch.equal(lm.module(input_ids=x).logits, back.module(input_ids=x).logits)


@pytest.mark.parametrize("stage, needle", [
    ({"sparsity": 0.5, "schedule": {"initial": 0.7}}, "schedule.initial 0.7 is above the final sparsity 0.5"),
    ({"pattern": "2:4"}, "gradual cannot schedule pattern {'type': 'nm'"),
    ({"schedule": {"start": 0.6, "end": 0.4}}, "end 0.4 must come after start 0.6"),
    ({"schedule": {"every": 0}}, "every"),
    ({"train": {"steps": 0}}, "steps"),
])
def test_bad_schedules_are_refused_at_load(stage, needle):
    with pytest.raises(ModelpressError, match="stages\\[0\\]") as e:
        parse_recipe({"stages": [{"method": "gradual", **stage}]})
    assert needle in str(e.value)


def test_token_budget_smaller_than_one_step_is_refused():
    lm = mp.load(make_tiny_llama(seed=4, layers=1))
    with pytest.raises(ModelpressError, match="less than one step"):
        mp.compress(lm, {"stages": [{"method": "gradual", "train": {"tokens": 20, "batch_size": 4}}]},
                    calib=ids(), progress=False)
