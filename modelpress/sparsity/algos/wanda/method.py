"""Wanda as a recipe stage: input norms from the sequential engine's hooks, maths in ``wanda.py``."""
from __future__ import annotations

from typing import Literal

import torch.nn as nn
from pydantic import Field

from ....calib.stats import ActStatsAccumulator
from ....models.loading import LoadedModel
from ....core.method import METHODS, MethodEntry, RunContext
from ....models.selection import layer_weight
from ...apply import install_pruned, record_pruned
from ...config import PruneConfig
from ...stage import CalibratedPruneStage
from ..magnitude import magnitude_layers
from .wanda import wanda_mask


class WandaConfig(PruneConfig):
    """Wanda pruning (calibrated, no weight update).

    Example:
        >>> WandaConfig(pattern="2:4").target_sparsity()
        0.5
    """

    method: Literal["wanda"] = "wanda"
    true_sequential: bool = Field(False, description="within a block, later layers see earlier ones pruned")


def wanda_stage(lm: LoadedModel, cfg: WandaConfig) -> CalibratedPruneStage:
    layers = magnitude_layers(lm, cfg)
    sparsity = None if cfg.pattern.fixed_sparsity() is not None else cfg.target_sparsity()

    def prune(name: str, module: nn.Module, acc: ActStatsAccumulator, ctx: RunContext) -> None:
        W = layer_weight(name, module)  # (out, in)
        if acc.ntokens == 0:
            ctx.warn(f"{name}: received no calibration tokens; pruned by magnitude instead")
        norm = acc.l2_norm if acc.ntokens else W.new_ones(W.shape[1])  # (in,)
        mask = wanda_mask(W, norm, cfg.pattern, sparsity, name)
        install_pruned(lm.module, name, module, W, mask, cfg.pattern, cfg.storage)
        record_pruned(ctx, "wanda", name, W, mask, cfg.pattern, storage=cfg.storage)

    return CalibratedPruneStage([n for n, _ in layers], ActStatsAccumulator, prune, cfg.true_sequential)


METHODS.register("wanda")(MethodEntry(WandaConfig, None, needs_calibration=True, block_stage=wanda_stage,
                                      summary="Wanda: prune by |W| * ||X||, per output row (calibrated)"))
