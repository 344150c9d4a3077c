"""The recover stage and the pruning-during-training stages as whole runs: recover keeps masks and
grids and brings the pruned model closer to the float one; before any compression it does nothing;
lottery-ticket rewinding holds the step-k weights on its surviving positions (checked against an
independent training run); a run killed mid-training (in either lottery phase) resumes to the
weights of an uninterrupted one."""
from __future__ import annotations

import copy

import pytest
import torch

import modelpress as mp
from modelpress.core.errors import ModelpressError
from modelpress.distill.losses import hard_ce
from modelpress.distill.trainer import TrainConfig, TrainData, Trainer
from modelpress.pipeline.recipe import parse_recipe
from modelpress.sparsity.layer import SparseLayer
from tests.conftest import make_tiny_llama


def ids(n=16, length=16, seed=0):
    return torch.randint(3, 300, (n, length), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def kl_to(ref, model, x):
    p = torch.log_softmax(logits(ref, x), -1)
    q = torch.log_softmax(logits(model, x), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_recover_keeps_the_masks_and_moves_toward_the_float_model():
    float_model = make_tiny_llama(seed=7, layers=2)
    lm = mp.load(copy.deepcopy(float_model))
    data = torch.randint(3, 40, (32, 16), generator=torch.Generator().manual_seed(1))  # a narrow "language"
    mp.compress(lm, {"stages": [{"method": "magnitude", "sparsity": 0.7}]}, calib=data, progress=False)
    masks = {n: m.mask.clone() for n, m in lm.module.named_modules() if isinstance(m, SparseLayer)}
    held_out = torch.randint(3, 40, (4, 16), generator=torch.Generator().manual_seed(2))
    before = kl_to(float_model, lm.module, held_out)
    lm2 = mp.load(copy.deepcopy(float_model))
    rep = mp.compress(lm2, {"stages": [{"method": "magnitude", "sparsity": 0.7},
                                       {"method": "recover", "losses": [{"type": "kd", "temperature": 1.0, "alpha": 1.0}],
                                        "train": {"steps": 40, "batch_size": 8, "lr": 3e-3}}]},
                      calib=data, progress=False)
    after = kl_to(float_model, lm2.module, held_out)
    assert after < 0.7 * before, (before, after)
    for n, m in lm2.module.named_modules():
        if isinstance(m, SparseLayer):
            assert torch.equal(m.mask, masks[n]) and not m.weight.detach()[~m.mask].any(), n
    assert rep["stages"][1]["metrics"][0]["steps"] == 40


def test_recover_keeps_the_quantisation_grid():
    lm = mp.load(make_tiny_llama(seed=8, layers=1))
    rep = mp.compress(lm, {"stages": [{"method": "rtn", "format": {"type": "int", "bits": 3, "granularity": 32}},
                                      {"method": "recover", "train": {"steps": 4, "batch_size": 4, "lr": 1e-2}}]},
                      calib=ids(), progress=False)
    from modelpress.quant.qlinear import QuantLinear

    q = lm.module.model.layers[0].mlp.down_proj
    assert isinstance(q, QuantLinear)
    w = q.dequantized_weight()
    assert torch.equal(q.fmt.quantize(w, stored=q.qtensor().params).dequantize(), w)  # still on its grid
    assert rep["stages"][1]["metrics"][0]["steps"] == 4


def test_recover_before_any_compression_says_it_does_nothing():
    base = make_tiny_llama(seed=9, layers=1)
    lm = mp.load(copy.deepcopy(base))
    rep = mp.compress(lm, {"stages": [{"method": "recover", "train": {"steps": 3, "batch_size": 4}}]},
                      calib=ids(), progress=False)
    assert any("nothing to recover" in w for w in rep["warnings"])
    for (k, a), b in zip(base.state_dict().items(), lm.module.state_dict().values()):
        assert torch.equal(a, b), k


def test_recover_refuses_a_token_budget_below_one_step():
    lm = mp.load(make_tiny_llama(seed=9, layers=1))
    with pytest.raises(ModelpressError, match="recover: train.tokens 50 is less than one step \\(batch_size 4 x 16"):
        mp.compress(lm, {"stages": [{"method": "magnitude"},
                                    {"method": "recover", "train": {"tokens": 50, "batch_size": 4}}]},
                    calib=ids(), progress=False)


def ce_step(model, batch):
    return hard_ce(model(input_ids=batch.input_ids).logits, batch), int(batch.input_ids.numel())


class Kill:
    """Raise KeyboardInterrupt at the ``n``-th forward of ``module`` (a killed process)."""

    def __init__(self, module, n):
        self.n, self.calls = n, 0
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, *_):
        self.calls += 1
        if self.calls == self.n:
            self.handle.remove()
            raise KeyboardInterrupt


LOTTERY = {"method": "lottery", "sparsity": 0.6, "rewind_step": 3, "prune_at": 0.5, "losses": [{"type": "ce"}],
           "train": {"steps": 12, "batch_size": 4, "lr": 5e-3, "checkpoint_every": 2}}


def test_rewound_ticket_holds_the_step_k_weights_on_its_survivors(tmp_path):
    base = make_tiny_llama(seed=10, layers=1)
    data = ids()
    # independently: plain training of the dense model for the first phase, recording step 3
    ref = copy.deepcopy(base)
    at_k = {}

    class Record:
        def on_gradients(self, step, model):
            pass

        def on_step(self, step, model, optimizer):
            if step == 3:
                at_k.update({n: p.detach().clone() for n, p in ref.named_parameters()})

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    Trainer(ref, ce_step, TrainData(data), TrainConfig(steps=6, batch_size=4, lr=5e-3), hooks=Record(),
            progress=False).train()
    # the stage, killed at the first forward of the retraining phase (forward 7): the ticket is on disk
    lm = mp.load(copy.deepcopy(base))
    Kill(lm.module, 7)
    with pytest.raises(KeyboardInterrupt):
        mp.compress(lm, {"stages": [LOTTERY]}, calib=data, progress=False, workdir=tmp_path / "w")
    lm = mp.load(copy.deepcopy(base))
    seen = {}

    def first_forward(module, args):
        if not seen:
            seen.update({n: (m.weight.detach().clone(), m.mask.clone()) for n, m in module.named_modules()
                         if isinstance(m, SparseLayer)})

    lm.module.register_forward_pre_hook(first_forward)
    mp.compress(lm, {"stages": [LOTTERY]}, calib=data, progress=False, workdir=tmp_path / "w")
    assert len(seen) == 7
    trained = dict(ref.named_parameters())
    for n, (w, mask) in seen.items():
        k = mask.numel() - round(0.6 * mask.numel())  # magnitude mask of the weights after phase 1
        top = torch.zeros(mask.numel(), dtype=torch.bool)
        top[trained[f"{n}.weight"].detach().abs().flatten().topk(k).indices] = True
        assert torch.equal(mask.flatten(), top), n
        torch.testing.assert_close(w[mask], at_k[f"{n}.weight"][mask], rtol=0, atol=0)
        assert not w[~mask].any(), n
    norm = "model.layers.0.input_layernorm.weight"  # every parameter was rewound, not only the pruned
    assert not torch.equal(at_k[norm], trained[norm])


def retraining_start(base, stage, data):
    """Every parameter, and every pruned layer's mask, at the first forward of the retraining phase
    (the first forward that meets a SparseLayer)."""
    lm = mp.load(copy.deepcopy(base))
    seen = {}

    def first_forward(module, args):
        masks = {n: m.mask.clone() for n, m in module.named_modules() if isinstance(m, SparseLayer)}
        if masks and not seen:
            seen.update(masks=masks, params={n: p.detach().clone() for n, p in module.named_parameters()})

    lm.module.register_forward_pre_hook(first_forward)
    mp.compress(lm, {"stages": [stage]}, calib=data, progress=False)
    return seen["masks"], seen["params"]


def test_random_reinit_control_holds_a_fresh_init_under_the_tickets_masks():
    from modelpress.models.initialise import random_init_

    base, data = make_tiny_llama(seed=10, layers=1), ids()
    t_masks, ticket = retraining_start(base, LOTTERY, data)
    c_masks, control = retraining_start(base, {**LOTTERY, "reinit": True, "reinit_seed": 5}, data)
    fresh = {n: p.detach() for n, p in random_init_(copy.deepcopy(base), 5).named_parameters()}
    assert len(t_masks) == 7 and t_masks.keys() == c_masks.keys()
    for n, mask in t_masks.items():
        w, w_ticket = control[f"{n}.weight"], ticket[f"{n}.weight"]
        assert torch.equal(c_masks[n], mask), n  # the identical mask
        torch.testing.assert_close(w[mask], fresh[f"{n}.weight"][mask], rtol=0, atol=0)
        assert not w[~mask].any(), n
        assert not torch.equal(w[mask], w_ticket[mask]), n  # not the ticket's step-k values
        assert not torch.equal(w[mask], base.get_parameter(f"{n}.weight")[mask]), n  # nor the original init
    emb = "model.embed_tokens.weight"  # the unpruned parameters are drawn afresh too
    assert torch.equal(control[emb], fresh[emb]) and not torch.equal(ticket[emb], fresh[emb])


def test_rewind_beyond_the_run_is_refused_at_load():
    with pytest.raises(ModelpressError, match="stages\\[0\\].*rewind_step 9 is beyond the training run before "
                                              "pruning: 5 of 10 steps"):
        parse_recipe({"stages": [{**LOTTERY, "rewind_step": 9, "train": {"steps": 10}}]})
    with pytest.raises(ModelpressError, match="at least 2 training steps"):
        parse_recipe({"stages": [{**LOTTERY, "rewind_step": 0, "train": {"steps": 1}}]})


RESUMABLE = {
    "gradual": {"method": "gradual", "sparsity": 0.7, "schedule": {"every": 2}},
    "movement-hard": {"method": "movement", "sparsity": 0.7, "schedule": {"start": 0.2, "every": 2}},
    "movement-soft": {"method": "movement", "variant": "soft", "regularization": 20.0, "score_lr": 0.3,
                      "schedule": {"every": 2}},
    "lottery-phase-1": LOTTERY,
    "lottery-phase-2": LOTTERY,
    "recover": None,
}
KILL_AT = {"lottery-phase-1": 6, "lottery-phase-2": 10}


@pytest.mark.parametrize("name", list(RESUMABLE))
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, name):
    stage = RESUMABLE[name]
    train = {"steps": 12, "batch_size": 4, "lr": 5e-3, "checkpoint_every": 2}
    stages = ([{"method": "magnitude", "sparsity": 0.5}, {"method": "recover", "train": train}] if stage is None
              else [{**stage, "train": train}])
    base = make_tiny_llama(seed=11, layers=1)
    recipe = {"stages": stages}
    ref = mp.load(copy.deepcopy(base))
    mp.compress(ref, recipe, calib=ids(), progress=False)
    lm = mp.load(copy.deepcopy(base))
    Kill(lm.module, KILL_AT.get(name, 8))
    with pytest.raises(KeyboardInterrupt):
        mp.compress(lm, recipe, calib=ids(), progress=False, workdir=tmp_path / "w")
    lm = mp.load(copy.deepcopy(base))
    rep = mp.compress(lm, recipe, calib=ids(), progress=False, workdir=tmp_path / "w")
    resumed = rep["stages"][-1]["metrics"][0]["resumed_from"]
    assert resumed > 0 or name == "lottery-phase-2", rep["stages"][-1]["metrics"]
    for (k, a), (k2, b) in zip(ref.module.state_dict().items(), lm.module.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k


@pytest.mark.parametrize("method", ["gradual", "movement", "lottery", "recover"])
def test_too_little_text_for_one_batch_is_refused_naming_the_stage(method):
    lm = mp.load(make_tiny_llama(seed=9, layers=1))
    stages = ([{"method": "magnitude"}] if method == "recover" else []) + [
        {"method": method, "train": {"steps": 4, "batch_size": 32}}]
    with pytest.raises(ModelpressError, match=f"^{method}[a-z-]*: the training text gives 16 sequences, fewer than "
                                              "one batch of 32"):
        mp.compress(lm, {"stages": stages}, calib=ids(), progress=False)
