"""``block-error``: how far each compressed block's output is from the float model's, block by block.

A reconstruction stage (it sees the float reference): for every decoder block it compares the
compressed block's output on the compressed stream with the float block's output on the float
stream for the same calibration tokens, and reports ``||y - y_float|| / ||y_float||``. The error
accumulates through the blocks, so the row where it jumps is the block to look at. It changes
nothing, and placed after block-wise stages it shares their pass (no extra calibration forward).

Example recipe::

    stages:
      - {method: gptq, format: {type: int, bits: 3, granularity: 64}}
      - {method: block-error}
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn

from ..calib.blocks import BlockInputs
from ..core.method import METHODS, LayerRecord, MethodConfig, MethodEntry, StageContext, StageKind
from ..models.loading import LoadedModel


class BlockErrorConfig(MethodConfig):
    """Measure each block's output error against the float reference (no change to the model)."""

    method: Literal["block-error"] = "block-error"


class BlockErrorStage:
    """Relative output error of each block on the calibration tokens."""

    def process_block(self, lm: LoadedModel, index: int, block: nn.Module, prefix: str, inputs: BlockInputs,
                      ctx: StageContext, targets: torch.Tensor) -> None:
        out = inputs.outputs(block)  # (n, seq, hidden): the compressed block on the compressed stream
        err = float((out - targets).norm() / targets.norm().clamp_min(1e-20))
        ctx.layers.append(LayerRecord(prefix, "block-error", out_rel_error=err,
                                      notes=[f"block {index}: ||y - y_float|| / ||y_float|| = {err:.4g}"]))


METHODS.register("block-error")(MethodEntry(
    BlockErrorConfig, None, needs_calibration=True, block_stage=lambda lm, cfg: BlockErrorStage(),
    kind=StageKind.RECONSTRUCTION, summary="measure each block's output error against the float model"))
