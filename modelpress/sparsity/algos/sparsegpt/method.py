"""SparseGPT as a recipe stage: Hessians from the sequential engine's hooks, maths in ``sparsegpt.py``.

With ``format:`` the kept weights are quantised in the same pass (joint sparse + quantised, as in
the paper); the layer becomes a ``QuantLinear`` whose pruned weights hold the exact-zero code.
Layers reading the same input (q/k/v, gate/up) share one Hessian.
"""
from __future__ import annotations

from typing import ClassVar, Literal, Optional

import torch.nn as nn
from pydantic import Field, field_validator, model_validator

from ....calib.obs import output_rel_error
from ....calib.stats import HessianAccumulator
from ....models.loading import LoadedModel
from ....core.method import METHODS, MethodEntry, RunContext
from ....models.selection import layer_weight
from ....quant.apply import install_quantized, record_quantized
from ....quant.fields import FormatField
from ...apply import install_pruned, record_pruned
from ...patterns import NM, SparsityPattern, Unstructured
from ...config import PruneConfig
from ...masks import mask_from_scores
from ...stage import CalibratedPruneStage
from ..magnitude import magnitude_layers
from .sparsegpt import sparsegpt_prune


class SparseGPTConfig(PruneConfig):
    """SparseGPT pruning with OBS weight updates, optionally joint with quantisation.

    Example:
        >>> SparseGPTConfig(pattern="2:4", format={"type": "int", "bits": 4, "granularity": 128}).format.bits
        4
    """

    format_needs: ClassVar[tuple[str, ...]] = ("exact_zero",)  # pruned weights are stored as code-for-zero

    method: Literal["sparsegpt"] = "sparsegpt"
    blocksize: int = Field(128, gt=0, description="columns per adaptive mask selection and lazy update")
    dampening_frac: float = Field(0.01, gt=0, lt=1, description="percdamp: fraction of mean diag(H) added")
    format: Optional[FormatField] = Field(None, description="quantise kept weights in the same pass")
    true_sequential: bool = Field(False, description="within a block, later layers see earlier ones pruned")

    @field_validator("pattern")
    @classmethod
    def _elementwise_obs(cls, p: SparsityPattern) -> SparsityPattern:
        if not isinstance(p, (Unstructured, NM)):  # the OBS loop picks single weights per row
            raise ValueError(f"sparsegpt supports unstructured and N:M patterns, not {p.type} ({p.label}): "
                             "use magnitude or wanda for block sparsity")
        return p

    @model_validator(mode="after")
    def _blocks_hold_whole_groups(self) -> "SparseGPTConfig":
        if isinstance(self.pattern, NM) and self.blocksize % self.pattern.m:
            raise ValueError(f"blocksize {self.blocksize} must be a multiple of {self.pattern.m} for "
                             f"{self.pattern.n}:{self.pattern.m} sparsity (groups must not straddle blocks)")
        return self


def sparsegpt_stage(lm: LoadedModel, cfg: SparseGPTConfig) -> CalibratedPruneStage:
    layers = magnitude_layers(lm, cfg)
    sparsity = None if cfg.pattern.fixed_sparsity() is not None else cfg.target_sparsity()

    def prune(name: str, module: nn.Module, acc: HessianAccumulator, ctx: RunContext) -> None:
        W = layer_weight(name, module)  # (out, in)
        if acc.nsamples == 0:
            ctx.warn(f"{name}: received no calibration tokens; pruned by magnitude instead")
            mask = mask_from_scores(W.abs(), cfg.pattern, sparsity, layer=name)
            install_pruned(lm.module, name, module, W, mask, cfg.pattern, cfg.storage)
            record_pruned(ctx, "magnitude(fallback)", name, W, mask, cfg.pattern, storage=cfg.storage)
            return
        res = sparsegpt_prune(W, acc.H, cfg.pattern, sparsity, blocksize=cfg.blocksize,
                              percdamp=cfg.dampening_frac, fmt=cfg.format)
        for w in res.warnings:
            ctx.warn(f"{name}: {w}")
        err = output_rel_error(W, res.W, acc.H)
        if res.qtensor is not None:
            install_quantized(lm.module, name, module, res.qtensor)
            rec = record_quantized(ctx, "sparsegpt", name, W, res.qtensor, res.W, out_rel_error=err)
            rec.notes.append(f"sparsity {1 - float(res.mask.float().mean()):.4f} ({cfg.pattern.to_dict()}), "
                             "pruned weights stored as the exact-zero code")
            return
        install_pruned(lm.module, name, module, res.W, res.mask, cfg.pattern, cfg.storage)
        record_pruned(ctx, "sparsegpt", name, W, res.mask, cfg.pattern, res.W, storage=cfg.storage,
                      out_rel_error=err)

    return CalibratedPruneStage([n for n, _ in layers], HessianAccumulator, prune, cfg.true_sequential)


METHODS.register("sparsegpt")(MethodEntry(SparseGPTConfig, None, needs_calibration=True, block_stage=sparsegpt_stage,
                                          summary="SparseGPT: OBS pruning with weight updates, optional joint quantisation"))
