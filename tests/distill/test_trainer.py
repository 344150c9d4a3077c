"""The trainer: it learns, a killed run resumes to the same weights, DDP on 2 processes follows the
1-process curve with the same global batch, pruned weights stay zero."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modelpress.core.errors import ModelpressError
from modelpress.distill.losses import hard_ce
from modelpress.distill.trainer import TrainConfig, TrainData, Trainer, lr_lambda, own_lr, sample_order
from tests.conftest import make_tiny_llama

ROOT = Path(__file__).resolve().parents[2]


def ce_step(model, batch):
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    return hard_ce(out.logits, batch), int(batch.input_ids.numel())


def data(n=32, length=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(3, 40, (n, length), generator=g)
    return TrainData(base)


def test_training_lowers_the_loss():
    model = make_tiny_llama(seed=1, layers=2)
    res = Trainer(model, ce_step, data(), TrainConfig(steps=30, batch_size=8, lr=3e-3, log_every=5), progress=False).train()
    assert res.steps == 30 and res.tokens == 30 * 8 * 16
    assert res.losses[-1][1] < 0.8 * res.losses[0][1]


def test_schedules_and_sample_order():
    f = lr_lambda("cosine", 100, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5, abs=0.02) and f(100) == pytest.approx(0.0, abs=1e-9)
    assert lr_lambda("linear", 10, 0.0)(5) == pytest.approx(0.5)
    a = sample_order(20, 3, 4, seed=7)
    assert torch.equal(a, sample_order(20, 3, 4, seed=7)) and len(set(a.tolist())) == 4
    epoch = torch.cat([sample_order(20, s, 4, seed=7) for s in range(5)])
    assert sorted(epoch.tolist()) == list(range(20))  # one epoch visits every sample once


def test_a_marked_parameter_trains_at_its_own_rate_under_the_shared_schedule():
    """Adam's first step moves every element by its group's rate (m / sqrt(v) = sign(g)): the marked norm
    gain by 1e-2, the rest by the config's 1e-4; the linear schedule scales both groups alike."""
    model = make_tiny_llama(seed=1, layers=1)
    gain = own_lr(model.model.norm.weight, 1e-2)
    before = copy.deepcopy(model.state_dict())
    cfg = TrainConfig(steps=4, batch_size=8, lr=1e-4, warmup=0.0, schedule="linear", clip=1.0)
    trainer = Trainer(model, ce_step, data(), cfg.model_copy(update={"steps": 1, "schedule": "constant"}),
                      progress=False)
    trainer.train()
    moved = (gain.detach() - before["model.norm.weight"]).abs()
    torch.testing.assert_close(moved, torch.full_like(moved, 1e-2), rtol=1e-3, atol=0)
    other = (model.model.layers[0].mlp.up_proj.weight.detach() - before["model.layers.0.mlp.up_proj.weight"]).abs()
    assert other.max() == pytest.approx(1e-4, rel=1e-3) and other.max() < 0.02 * moved.min()
    trainer = Trainer(make_tiny_llama(seed=1, layers=1), ce_step, data(), cfg, progress=False)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [1e-4, 1e-4]  # nothing marked: the two base groups
    model = make_tiny_llama(seed=1, layers=1)
    own_lr(model.model.norm.weight, 1e-2)
    trainer = Trainer(model, ce_step, data(), cfg, progress=False)
    trainer.train()
    lam = lr_lambda("linear", 4, 0.0)(4)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([1e-4 * lam, 1e-4 * lam, 1e-2 * lam])


def test_bad_budgets_and_batches_are_refused():
    with pytest.raises(ValueError, match="budget"):
        TrainConfig()
    with pytest.raises(ValueError, match="schedule needs its length"):
        TrainConfig(minutes=1)
    with pytest.raises(ValueError):
        TrainConfig(steps=0)
    with pytest.raises(ModelpressError, match="fewer than one batch"):
        Trainer(make_tiny_llama(), ce_step, data(n=4), TrainConfig(steps=1, batch_size=8), progress=False)


def test_activation_checkpointing_recomputes_blocks_and_trains_to_the_same_weights():
    """With ``activation_checkpointing`` the inside of every decoder block runs twice a step (forward, then
    again in the backward pass) and the trained weights equal those of a run that kept its activations."""
    runs = {}
    for on in (False, True):
        model = make_tiny_llama(seed=3, layers=2)
        calls = [0]
        model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        cfg = TrainConfig(steps=4, batch_size=8, lr=3e-3, activation_checkpointing=on)
        res = Trainer(model, ce_step, data(), cfg, progress=False).train()
        runs[on] = (model, calls[0], res)
        assert not model.is_gradient_checkpointing  # switched off again once training ends
    assert runs[False][1] == 4 and runs[True][1] == 8
    for (n, a), b in zip(runs[False][0].named_parameters(), runs[True][0].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    with pytest.raises(ModelpressError, match="activation_checkpointing"):
        Trainer(torch.nn.Linear(4, 4), lambda m, b: (m(b.input_ids.float()[:, :4]).sum(), 1), data(),
                TrainConfig(steps=1, batch_size=8, activation_checkpointing=True), progress=False)


class Boom(Exception):
    pass


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    base = make_tiny_llama(seed=2, layers=2)
    cfg = TrainConfig(steps=12, batch_size=8, lr=2e-3, checkpoint_every=4, grad_accum=2)
    ref = copy.deepcopy(base)
    Trainer(ref, ce_step, data(), cfg, progress=False).train()

    calls = {"n": 0}

    def dying(model, batch):
        calls["n"] += 1
        if calls["n"] > 2 * 6:  # 6 optimizer steps of 2 micro-steps, then the process "dies"
            raise Boom
        return ce_step(model, batch)

    model = copy.deepcopy(base)
    with pytest.raises(Boom):
        Trainer(model, dying, data(), cfg, workdir=tmp_path, progress=False).train()
    assert (tmp_path / "train-checkpoint" / "trainer.json").exists()
    fresh = copy.deepcopy(base)  # a new process starts from the initial weights again
    res = Trainer(fresh, ce_step, data(), cfg, workdir=tmp_path, progress=False).train()
    assert res.resumed_from == 4
    for (k, a), (_, b) in zip(ref.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), k
    assert not (tmp_path / "train-checkpoint").exists()


def test_checkpoint_of_another_job_is_redone_not_spliced(tmp_path):
    base = make_tiny_llama(seed=2, layers=2)
    cfg = TrainConfig(steps=8, batch_size=8, lr=2e-3, checkpoint_every=4)
    calls = {"n": 0}

    def dying(model, batch):
        calls["n"] += 1
        if calls["n"] > 5:
            raise Boom
        return ce_step(model, batch)

    with pytest.raises(Boom):
        Trainer(copy.deepcopy(base), dying, data(seed=0), cfg, workdir=tmp_path, progress=False).train()
    res = Trainer(copy.deepcopy(base), ce_step, data(seed=1), cfg, workdir=tmp_path, progress=False).train()
    assert res.resumed_from == 0  # other data: started afresh


def test_pruned_weights_stay_zero_through_training():
    from modelpress.sparsity.layer import SparseLayer

    model = make_tiny_llama(seed=3, layers=1)
    lin = model.model.layers[0].mlp.down_proj
    keep = torch.rand(lin.weight.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    model.model.layers[0].mlp.down_proj = SparseLayer.from_module(lin, keep)
    Trainer(model, ce_step, data(), TrainConfig(steps=5, batch_size=8, lr=1e-2, weight_decay=0.1), progress=False).train()
    w = model.model.layers[0].mlp.down_proj.weight
    assert torch.equal(w[~keep], torch.zeros_like(w[~keep])) and w[keep].abs().sum() > 0


WORKER = ROOT / "tests" / "distill" / "_ddp_worker.py"


@pytest.mark.parametrize("procs", [2])
def test_two_process_ddp_follows_the_one_process_curve(tmp_path, procs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MODELPRESS_PROGRESS": "0"}
    one = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "one.json")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
                          "--master_port", "29531", str(WORKER), str(tmp_path / "two.json")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    assert a["world_size"] == 1 and b["world_size"] == procs
    la, lb = [x[1] for x in a["losses"]], [x[1] for x in b["losses"]]
    assert len(la) == len(lb) == 12
    assert max(abs(x - y) / abs(x) for x, y in zip(la, lb)) < 1e-4, (la, lb)
    wa, wb = torch.tensor(a["final_weights"]), torch.tensor(b["final_weights"])
    assert torch.allclose(wa, wb, rtol=1e-4, atol=1e-5)


def test_quantised_layers_train_through_their_grid_and_pack_back_exactly():
    """A QuantLinear trains as fake-quantised float weights on its own stored grid; afterwards it is
    packed again with the same scales/zeros, and its outputs equal the fake-quantised layer's."""
    from modelpress.quant.fake import FakeQuantLinear
    from modelpress.quant.formats import format_from_dict
    from modelpress.quant.qlinear import QuantLinear

    model = make_tiny_llama(seed=4, layers=1)
    fmt = format_from_dict({"type": "int", "bits": 3, "granularity": 32, "symmetric": False})
    mlp = model.model.layers[0].mlp
    mlp.down_proj = QuantLinear.from_linear_weight(fmt.quantize(mlp.down_proj.weight), None)
    before = mlp.down_proj.qtensor()
    seen: list[torch.Tensor] = []

    def step(m, batch):  # records the fake-quantised layer's forward weight at each step
        layer = m.model.layers[0].mlp.down_proj
        assert isinstance(layer, FakeQuantLinear) and layer.weight.requires_grad
        seen.append(layer.quantized_weight().detach().clone())
        return ce_step(m, batch)

    Trainer(model, step, data(), TrainConfig(steps=6, batch_size=8, lr=5e-2), progress=False).train()
    after = model.model.layers[0].mlp.down_proj
    assert isinstance(after, QuantLinear)
    for k, v in before.params.items():  # the grid is the layer's own: parameters unchanged
        assert torch.equal(after.qtensor().params[k], v), k
    assert not torch.equal(after.qtensor().codes, before.codes), "training moved some weights across grid points"
    assert torch.equal(seen[0], before.dequantize())  # training started from the packed layer's weight
    w = after.dequantized_weight()
    assert torch.equal(fmt.quantize(w, stored=before.params).dequantize(), w)  # on the grid
