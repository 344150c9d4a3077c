"""Conv2d channel pruning: the shrunk CNN equals the dense CNN with those channels masked."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import modelpress as mp
from modelpress.core.errors import ModelpressError
from modelpress.sparsity.structured import find_conv_groups, prune_conv_channels


def small_cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(12, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 10),
    )
    for m in net.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


def masked_dense(net: nn.Sequential, removed: dict[str, list[int]]) -> nn.Sequential:
    """The dense reference: the consumers read nothing from the removed channels."""
    ref = copy.deepcopy(net)
    consumers = {"0": ("3", 1), "3": ("6", 1), "6": ("10", 16)}  # conv -> (layer reading it, columns per channel)
    for conv, chans in removed.items():
        name, per = consumers[conv]
        w = ref.get_submodule(name).weight.data
        for c in chans:
            w[:, c * per:(c + 1) * per] = 0
    return ref


@pytest.mark.parametrize("score", ["activation", "magnitude", "random"])
def test_channel_pruning_matches_masked_dense(score):
    net = small_cnn()
    images = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    res = prune_conv_channels(net, 0.25, score=score, example_inputs=images)
    assert {k: len(v) for k, v in res.removed.items()} == {"0": 2, "3": 3, "6": 2}
    ref = masked_dense(small_cnn(), res.removed)
    with torch.no_grad():
        torch.testing.assert_close(net(images), ref(images), atol=1e-5, rtol=1e-5)
    assert net[0].weight.shape == (6, 3, 3, 3) and net[1].running_mean.shape == (6,)
    assert net[3].weight.shape == (9, 6, 3, 3) and net[6].weight.shape == (6, 9, 3, 3)
    assert net[10].weight.shape == (10, 6 * 16)


def test_activation_score_removes_silent_channel():
    net = small_cnn(seed=2)
    net[3].weight.data[:, 5] *= 1e-4  # conv 3 barely reads channel 5 of conv 0
    images = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    res = prune_conv_channels(net, 0.1, score="activation", example_inputs=images)
    assert res.removed["0"] == [5]


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.a(x))
        y = y + self.b(y)  # a's and b's channels meet in an add: neither can shrink alone
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def test_residual_convs_are_reported_not_pruned():
    groups, skipped = find_conv_groups(Residual())
    assert groups == [] and any(s.startswith("a:") for s in skipped) and any(s.startswith("b:") for s in skipped)
    with pytest.raises(ModelpressError, match="no prunable Conv2d"):
        prune_conv_channels(Residual(), 0.25)


def test_recipe_stage_on_cnn_and_bad_fraction():
    net = small_cnn(seed=4)
    lm = mp.load(net)
    ctx = mp.apply(lm, {"stages": [{"method": "structured", "channels_fraction": 0.5, "score": "magnitude"}]},
                   progress=False)
    assert net[0].out_channels == 4 and len(ctx.layers) == 3
    with pytest.raises(ModelpressError, match="channels_fraction"):
        mp.apply(mp.load(small_cnn()), {"stages": [{"method": "structured", "channels_fraction": 1.0}]}, progress=False)
    with pytest.raises(ModelpressError, match="need example inputs"):
        prune_conv_channels(small_cnn(), 0.25, score="activation")
