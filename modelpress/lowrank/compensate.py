"""Low-rank compensation of quantisation error (EoRA, Liu et al. 2024; LQER, Zhang et al. 2024) as a
recipe stage placed after any weight quantiser::

    stages:
      - {method: gptq, format: {type: int, bits: 3, granularity: 64}}
      - {method: eora, rank: 32}

Per quantised layer, the residual ``E = W - Q`` (W from the float reference, Q the quantised
weight) is factorised by the activation-weighted SVD that SVD-LLM uses for weights: the SVD of
``E S`` with ``S S^T = X^T X`` (X the layer's calibration inputs in the quantised model). Any square
root of the Gram matrix gives the same truncation, so this is EoRA's eigenspace projection; the
rank-r term ``B A`` minimises ``||(E - B A) X^T||_F``, the output error left by the quantiser. The
layer becomes a :class:`CompensatedLinear` computing ``Q x + B (A x)``.
"""
from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn as nn
from pydantic import Field

from ..calib.observed import ObservedBlockStage
from ..calib.stats import HessianAccumulator
from ..core.errors import ModelpressError
from ..core.layers import is_compressed, set_submodule
from ..core.method import METHODS, LayerRecord, MethodConfig, MethodEntry, RunContext
from ..models.layers import linear_shape, linear_weight
from ..models.loading import LoadedModel
from ..models.selection import select_layers
from .factor import Factors, check_rank, whitened_factor
from .layer import CompensatedLinear, dense_of


class EoRAConfig(MethodConfig):
    """Rank-r compensation of the previous quantisation stage's error.

    Example:
        >>> EoRAConfig(rank=32).to_dict()["rank"]
        32
    """

    #: it reads quantised layers (their float weight comes from the float reference)
    needs_float_weights: ClassVar[bool] = False

    method: Literal["eora"] = "eora"
    rank: int = Field(32, ge=1, description="rank of the correction B A (at most min(out, in))")
    dampening: float = Field(0.0, ge=0, lt=1, description="fraction of mean diag(X^T X) added before Cholesky; "
                                                          "raised automatically while it is not positive definite")
    true_sequential: bool = Field(True, description="later layers of a block see earlier ones compensated")


class EoRAStage(ObservedBlockStage):
    """Block stage: Gram matrix per input set, then each quantised layer's residual factorised."""

    def __init__(self, cfg: EoRAConfig, selected: list[str]) -> None:
        super().__init__(selected, HessianAccumulator, self._compensate_set,
                         cfg.true_sequential)
        self.cfg = cfg
        self._float: tuple[str, nn.Module] | None = None  # (block prefix, float reference block)

    def process_block(self, lm, index, block, prefix, inputs, ctx) -> None:
        if ctx.reference is None:
            raise ModelpressError("eora needs the float reference (the runner provides it)")
        self._float = (prefix, ctx.reference.block(index))
        try:
            super().process_block(lm, index, block, prefix, inputs, ctx)
        finally:
            self._float = None

    def _float_weight(self, name: str) -> torch.Tensor:
        prefix, blk = self._float
        return linear_weight(blk.get_submodule(name[len(prefix) + 1:])).detach().to(torch.float32)  # (out, in)

    def _compensate_set(self, lm: LoadedModel, mods: dict[str, nn.Module], acc: HessianAccumulator,
                        ctx: RunContext) -> None:
        for name, module in mods.items():
            _check_quantised(name, module)
            W = self._float_weight(name)
            Q = dense_of(module)  # (out, in)
            check_rank(self.cfg.rank, tuple(W.shape), name)
            if acc.nsamples == 0:
                ctx.warn(f"{name}: received no calibration tokens; left uncompensated")
                continue
            f = whitened_factor(W - Q, acc.H, self.cfg.rank, self.cfg.dampening)
            new = CompensatedLinear.from_factors(module, f.B, f.A)
            set_submodule(lm.module, name, new)
            _record(ctx, name, W, Q, new, f, acc.H)


def _record(ctx: RunContext, name: str, W: torch.Tensor, Q: torch.Tensor, new: CompensatedLinear, f: Factors,
            G: torch.Tensor) -> None:
    """Report row: weight and output error after compensation, and the output error before it."""
    saved = new.dequantized_weight()
    G = G.double()

    def out_err(E: torch.Tensor) -> float:
        num = torch.einsum("oi,ij,oj->", E.double(), G, E.double())
        return float((num / torch.einsum("oi,ij,oj->", W.double(), G, W.double()).clamp_min(1e-300)).clamp_min(0).sqrt())

    before, after = out_err(W - Q), out_err(W - saved)
    rec = LayerRecord(name, "eora", None, tuple(W.shape), 8.0 * new.stored_bytes() / W.numel(),
                      float((W - saved).norm() / W.norm().clamp_min(1e-12)), after,
                      [f"rank {f.rank}: output error {before:.4g} -> {after:.4g} (relative, calibration inputs)"] + f.notes)
    for n in f.notes:
        ctx.warn(f"{name}: {n}")
    ctx.layers.append(rec)


def _check_quantised(name: str, m: nn.Module) -> None:
    """Only quantised layers are compensated: a float layer has no error to correct (refused)."""
    if not is_compressed(m) or not callable(getattr(m, "dequantized_weight", None)) or isinstance(m, CompensatedLinear):
        raise ModelpressError(f"stage 'eora': layer {name} is not quantised ({type(m).__name__}); place eora after a "
                              "weight quantisation stage, or add the layer to its ignore list")


def eora_stage(lm: LoadedModel, cfg: EoRAConfig) -> EoRAStage:
    """The layers are checked block by block: a quantiser in the same pass runs on each block first."""
    layers = select_layers(lm, cfg)
    for n, m in layers:
        check_rank(cfg.rank, linear_shape(m), n)
    return EoRAStage(cfg, [n for n, _ in layers])


METHODS.register("eora")(MethodEntry(EoRAConfig, None, needs_calibration=True, block_stage=eora_stage,
                                     needs_reference=True,
                                     summary="EoRA/LQER: rank-r activation-weighted SVD of a quantiser's residual"))
