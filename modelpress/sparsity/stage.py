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

from ..models.loading import LoadedModel
from ..core.method import RunContext
from ..calib.observed import ObservedBlockStage

#: (layer name, module, the accumulator of its input set, run context) -> None
PruneFn = Callable[[str, nn.Module, Any, RunContext], None]


class CalibratedPruneStage(ObservedBlockStage):
    """Block stage: statistics from hooks, then ``prune(name, module, acc, ctx)`` for each layer."""

    def __init__(self, selected: list[str], make_acc: Callable[[int], Any], prune: PruneFn,
                 true_sequential: bool = False) -> None:
        def apply_set(lm: LoadedModel, mods: dict[str, nn.Module], acc: Any, ctx: RunContext) -> None:
            for n, m in mods.items():
                prune(n, m, acc, ctx)

        super().__init__(selected, make_acc, apply_set, true_sequential)
        self.prune = prune
