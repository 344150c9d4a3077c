"""The per-block scaffold shared by calibrated pruners (Wanda, SparseGPT) on the sequential engine.

For each block: the selected layers are split into groups (all at once, as the Wanda and SparseGPT
reference code does, or in the ArchSpec's true-sequential order); one forward over the cached
calibration inputs feeds an accumulator per *input set* (q/k/v read the same tensor: one
accumulator, one Hessian), then each layer is pruned from its set's statistics. The engine then
propagates the pruned block's outputs to the next block.
"""
from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn

from ..calib.capture import capture_inputs
from ..models.loading import LoadedModel
from ..pipeline.methods import RunContext, layer_weight
from ..pipeline.sequential import BlockInputs, last_module

#: (layer name, module, the accumulator of its input set, run context) -> None
PruneFn = Callable[[str, nn.Module, Any, RunContext], None]


class CalibratedPruneStage:
    """Block stage: statistics from hooks, then ``prune(name, module, acc, ctx)`` for each layer."""

    def __init__(self, selected: list[str], make_acc: Callable[[int], Any], prune: PruneFn,
                 true_sequential: bool = False) -> None:
        self.selected = set(selected)
        self.make_acc = make_acc  # in_features -> accumulator with .update(x)
        self.prune = prune
        self.true_sequential = true_sequential

    def process_block(self, lm: LoadedModel, index: int, block: nn.Module, prefix: str,
                      inputs: BlockInputs, ctx: RunContext) -> None:
        names = [n for n in sorted(self.selected) if n.startswith(prefix + ".")]
        for group in layer_groups(lm, prefix, names, self.true_sequential):
            mods = {n: lm.module.get_submodule(n) for n in group}
            sets = shared_input_sets(lm, prefix, group)
            accs = {s[0]: self.make_acc(layer_weight(s[0], mods[s[0]]).shape[1]) for s in sets}
            with capture_inputs({n: mods[n] for n in accs}, lambda n, x: accs[n].update(x.float())):
                inputs.run(block, stop_after=last_module(block, mods.values()))
            for s in sets:
                for n in s:
                    self.prune(n, lm.module.get_submodule(n), accs[s[0]], ctx)


def layer_groups(lm: LoadedModel, prefix: str, names: list[str], true_sequential: bool) -> list[list[str]]:
    """``names`` in one group, or split by the ArchSpec's true-sequential order (rest last)."""
    if not true_sequential or lm.spec is None or not lm.spec.sequential:
        return [names]
    groups, placed = [], set()
    for roles in lm.spec.sequential:
        g = [f"{prefix}.{lm.spec.roles[r]}" for r in roles if f"{prefix}.{lm.spec.roles[r]}" in names]
        placed.update(g)
        if g:
            groups.append(g)
    rest = [n for n in names if n not in placed]
    return groups + ([rest] if rest else [])


def shared_input_sets(lm: LoadedModel, prefix: str, group: list[str]) -> list[list[str]]:
    """``group`` split into sets of layers reading the same input (ArchSpec scale mappings)."""
    spec, left, sets = lm.spec, list(group), []
    for _prev, roles in (spec.scale_mappings if spec else ()):
        s = [n for n in (f"{prefix}.{spec.roles[r]}" for r in roles if r in spec.roles) if n in left]
        if len(s) > 1:
            sets.append(s)
            left = [n for n in left if n not in s]
    return sets + [[n] for n in left]
