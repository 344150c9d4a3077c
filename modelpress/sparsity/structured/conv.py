"""Conv2d output-channel pruning for plain CNNs: the conv, its BatchNorm and its consumers shrink.

The graph comes from ``torch.fx``: from each Conv2d the channels are followed through
channel-wise ops (BatchNorm2d, activations, pooling, dropout, flatten) to the layers that read
them: a Conv2d (input channels) or, after a flatten, a Linear (the channel's block of columns).
A conv whose output reaches anything else (a residual add, a concat, the model output) is left
alone and reported: removing its channels would need the other branch pruned alike.

Channel ``c``'s score is the activation-norm x weight-norm of what it feeds:
``sum_consumers sum_{j in cols(c)} ||X_j||^2 ||W[:, j]||^2`` (square-rooted), with ``X`` the
consumer's input on example data (``magnitude``: ``||X_j|| = 1``; ``random``: the baseline).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ...calib.capture import capture_inputs
from ...calib.stats import ActStatsAccumulator
from ...core.errors import ModelpressError
from .scores import Score, count_to_remove, lowest, random_scores

_PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Hardswish, nn.Mish,
                 nn.Dropout, nn.Dropout2d, nn.Identity, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
_PASS_FUNCS = {F.relu, torch.relu, F.relu6, F.gelu, F.silu, torch.sigmoid, torch.tanh, F.leaky_relu, F.max_pool2d,
               F.avg_pool2d, F.adaptive_avg_pool2d, F.dropout}
_PASS_METHODS = {"relu", "sigmoid", "tanh", "contiguous"}
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
_POOL_FUNCS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d}


@dataclass
class ConvGroup:
    """A prunable conv: the BatchNorms on its channels and the layers reading them."""

    conv: str
    norms: list[str] = field(default_factory=list)
    consumers: list[tuple[str, int]] = field(default_factory=list)  # (name, columns per channel)


@dataclass
class ConvPruneResult:
    """What was removed (conv name -> channels) and which convs were left alone, with why."""

    removed: dict[str, list[int]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def find_conv_groups(model: nn.Module) -> tuple[list[ConvGroup], list[str]]:
    """Prunable convs of ``model`` and the reasons the others are not (traced with ``torch.fx``)."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure means "not a plain CNN"
        raise ModelpressError(f"channel pruning needs a model torch.fx can trace: {str(e).splitlines()[0]}") from None
    mods = dict(gm.named_modules())
    groups, skipped = [], []
    for node in gm.graph.nodes:
        m = mods.get(node.target) if node.op == "call_module" else None
        if not isinstance(m, nn.Conv2d):
            continue
        found = _follow(node, mods, m.out_channels) if m.groups == 1 else f"nothing: it is grouped (groups={m.groups})"
        if isinstance(found, str):
            skipped.append(f"{node.target}: output reaches {found}; its channels are kept")
        else:
            groups.append(found)
    return groups, skipped


def _follow(start: fx.Node, mods: dict[str, nn.Module], channels: int) -> ConvGroup | str:
    """Walk the users of ``start`` to the layers reading its channels; a string says what blocked it."""
    group = ConvGroup(start.target)
    stack: list[tuple[fx.Node, bool]] = [(u, False) for u in start.users]  # (node, after a flatten)
    while stack:
        node, flat = stack.pop()
        m = mods.get(node.target) if node.op == "call_module" else None
        if isinstance(m, nn.Conv2d) and not flat and m.groups == 1:
            group.consumers.append((node.target, 1))
        elif isinstance(m, nn.Linear) and flat and m.in_features % channels == 0:
            group.consumers.append((node.target, m.in_features // channels))
        elif isinstance(m, nn.BatchNorm2d) and not flat:
            group.norms.append(node.target)
            stack.extend((u, flat) for u in node.users)
        elif _is_flatten(node, m) and not flat:
            stack.extend((u, True) for u in node.users)
        elif _channel_wise(node, m, flat):
            stack.extend((u, flat) for u in node.users)
        else:
            return f"{node.op} {getattr(node.target, '__name__', node.target)}"
    return group if group.consumers else "no layer that reads it"


def _is_flatten(node: fx.Node, m: nn.Module | None) -> bool:
    """A flatten of (N, C, H, W) into (N, C*H*W): channel c becomes columns [c*H*W, (c+1)*H*W)."""
    if isinstance(m, nn.Flatten):
        return m.start_dim == 1 and m.end_dim == -1
    if (node.op == "call_function" and node.target is torch.flatten) or (
            node.op == "call_method" and node.target == "flatten"):
        start_dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        return start_dim == 1 and len(node.args) <= 2 and "end_dim" not in node.kwargs
    return False


def _channel_wise(node: fx.Node, m: nn.Module | None, flat: bool) -> bool:
    """An op that keeps each channel's values apart (pooling only before a flatten)."""
    if m is not None:
        return isinstance(m, _PASS_MODULES) and not (flat and isinstance(m, _POOLS))
    if node.op == "call_function":
        return node.target in _PASS_FUNCS and not (flat and node.target in _POOL_FUNCS)
    return node.op == "call_method" and node.target in _PASS_METHODS


@torch.no_grad()
def channel_scores(model: nn.Module, groups: list[ConvGroup], score: Score, example_inputs: Any = None,
                   seed: int = 0, batch_size: int = 32) -> dict[str, torch.Tensor]:
    """(out_channels,) score per prunable conv (see the module docstring)."""
    if score == "random":
        return {g.conv: random_scores(model.get_submodule(g.conv).out_channels, seed + i) for i, g in enumerate(groups)}
    stats: dict[str, ActStatsAccumulator] = {}
    if score == "activation":
        if not isinstance(example_inputs, torch.Tensor):
            raise ModelpressError("activation scores for Conv2d channels need example inputs (an (N, C, H, W) tensor "
                                  "passed as calibration); use score: magnitude or random without data")
        names = {c for g in groups for c, _ in g.consumers}
        mods = {n: model.get_submodule(n) for n in names}
        for n, m in mods.items():
            stats[n] = ActStatsAccumulator(m.in_channels if isinstance(m, nn.Conv2d) else m.in_features)
        sink = lambda n, x: stats[n].update(x.movedim(1, -1) if x.dim() == 4 else x)  # noqa: E731 channels last
        with capture_inputs(mods, sink):
            for s in range(0, example_inputs.shape[0], batch_size):
                model(example_inputs[s:s + batch_size])
    return {g.conv: _group_score(model, g, stats) for g in groups}


def _group_score(model: nn.Module, g: ConvGroup, stats: dict[str, ActStatsAccumulator]) -> torch.Tensor:
    C = model.get_submodule(g.conv).out_channels
    total = torch.zeros(C, dtype=torch.float64)
    for name, per in g.consumers:
        W = model.get_submodule(name).weight.detach().double()
        w2 = W.pow(2).sum(dim=tuple(d for d in range(W.dim()) if d != 1))  # (in,) squared column norms
        x2 = stats[name].sq_sum.double() if name in stats else torch.ones_like(w2)
        total += (w2 * x2).reshape(C, per).sum(1)  # columns of channel c are [c*per, (c+1)*per)
    return total.sqrt()


def remove_channels(model: nn.Module, g: ConvGroup, remove: list[int]) -> None:
    """Remove output channels of ``g.conv``, the matching BatchNorm entries and consumer inputs."""
    conv = model.get_submodule(g.conv)
    C = conv.out_channels
    keep = torch.tensor([c for c in range(C) if c not in set(remove)], dtype=torch.long)
    _take(conv, "weight", 0, keep)
    _take(conv, "bias", 0, keep)
    conv.out_channels = int(keep.numel())
    for n in g.norms:
        bn = model.get_submodule(n)
        for attr in ("weight", "bias", "running_mean", "running_var"):
            _take(bn, attr, 0, keep)
        bn.num_features = int(keep.numel())
    for n, per in g.consumers:
        m = model.get_submodule(n)
        cols = (keep[:, None] * per + torch.arange(per)).reshape(-1)
        _take(m, "weight", 1, cols)
        if isinstance(m, nn.Conv2d):
            m.in_channels = int(keep.numel())
        else:
            m.in_features = int(cols.numel())


def _take(m: nn.Module, attr: str, dim: int, idx: torch.Tensor) -> None:
    t = getattr(m, attr, None)
    if t is None:
        return
    new = t.data.index_select(dim, idx).clone()
    if isinstance(t, nn.Parameter):
        setattr(m, attr, nn.Parameter(new, t.requires_grad))
    else:
        setattr(m, attr, new)  # a buffer: assignment keeps it registered


def prune_conv_channels(model: nn.Module, fraction: float, *, score: Score = "magnitude", example_inputs: Any = None,
                        seed: int = 0) -> ConvPruneResult:
    """Remove ``fraction`` of the output channels of every prunable Conv2d in place.

    Scores are computed on the dense model first, then every conv shrinks (a conv that is both a
    consumer and a producer loses columns and rows independently).

    Example:
        >>> res = prune_conv_channels(cnn, 0.25, score="activation", example_inputs=images)  # doctest: +SKIP
    """
    groups, skipped = find_conv_groups(model)
    if not groups:
        raise ModelpressError(f"{type(model).__name__}: no prunable Conv2d ({'; '.join(skipped) or 'none found'})")
    scores = channel_scores(model, groups, score, example_inputs, seed)
    res = ConvPruneResult(skipped=skipped)
    for g in groups:
        C = model.get_submodule(g.conv).out_channels
        res.removed[g.conv] = lowest(scores[g.conv], count_to_remove(fraction, C, f"{g.conv}: channels"))
    for g in groups:
        remove_channels(model, g, res.removed[g.conv])
    return res
