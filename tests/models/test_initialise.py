"""random_init_: a seeded fresh draw from the model's own initialiser, also for weights transformers
read from a checkpoint (it marks those, and its init functions skip marked weights)."""
from __future__ import annotations

import torch
import torch.nn as nn

import modelpress as mp
from modelpress.models.initialise import random_init_


def test_a_loaded_model_is_drawn_afresh_and_the_draw_depends_only_on_the_seed(tiny_llama_dir):
    loaded = {n: p.detach().clone() for n, p in mp.load(str(tiny_llama_dir)).module.named_parameters()}
    state = torch.random.get_rng_state()
    a = {n: p.detach() for n, p in random_init_(mp.load(str(tiny_llama_dir)).module, seed=3).named_parameters()}
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random state is untouched
    b = dict(random_init_(mp.load(str(tiny_llama_dir)).module, seed=3).named_parameters())
    c = dict(random_init_(mp.load(str(tiny_llama_dir)).module, seed=4).named_parameters())
    for n, w in a.items():
        assert torch.equal(w, b[n]), n
        if w.dim() == 2:  # linears and the embedding: N(0, initializer_range), not the loaded values
            assert not torch.equal(w, loaded[n]) and not torch.equal(w, c[n]), n
            assert abs(float(w.std()) - 0.02) < 0.004, (n, float(w.std()))
        else:  # RMSNorm weights at one
            assert torch.equal(w, torch.ones_like(w)), n


def test_a_plain_module_uses_reset_parameters():
    m = nn.Sequential(nn.Linear(8, 4), nn.LayerNorm(4))
    with torch.no_grad():
        m[1].weight.fill_(3.0)
    random_init_(m, seed=0)
    assert torch.equal(m[1].weight, torch.ones(4))
    assert torch.equal(m[0].weight, random_init_(nn.Sequential(nn.Linear(8, 4), nn.LayerNorm(4)), seed=0)[0].weight)
