"""GPTQ as a recipe stage: Hessians from the sequential engine's hooks, maths in ``gptq.py``."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from ....calib.obs import output_rel_error
from ....calib.stats import HessianAccumulator
from ....models.loading import LoadedModel
from ....core.method import METHODS, MethodConfig, MethodEntry, RunContext
from ....models.selection import layer_weight, select_layers
from ....calib.observed import ObservedBlockStage
from ...apply import install_quantized, record_quantized
from ...fields import FormatField
from ...formats import IntFormat
from ...formats.base import row_wise
from ...granularity import PerGroup
from .gptq import gptq_quantize


class GPTQConfig(MethodConfig):
    """GPTQ (Frantar et al., 2022) weight quantisation.

    Example:
        >>> GPTQConfig(format={"type": "int", "bits": 4, "granularity": 64}, act_order=True).blocksize
        128
    """

    method: Literal["gptq"] = "gptq"
    format: FormatField = IntFormat(bits=4, granularity=PerGroup(size=128))
    blocksize: int = Field(128, gt=0, description="columns per lazy batch update")
    dampening_frac: float = Field(0.01, gt=0, lt=1, description="percdamp: fraction of mean diag(H) added")
    act_order: bool = Field(False, description="quantise columns by decreasing Hessian diagonal (static groups)")
    true_sequential: bool = Field(True, description="within a block, later layers see earlier ones quantised")


class GPTQStage(ObservedBlockStage):
    """GPTQ on the shared observe-then-apply block stage: one Hessian per input set.

    Layers of one set share a Hessian and, for row-wise formats, are quantised as one stacked
    matrix: GPTQ treats rows independently, so stacking gives the same codes in one column loop.
    """

    def __init__(self, cfg: GPTQConfig, selected: list[str]) -> None:
        super().__init__(selected, HessianAccumulator, self._quantize_set, cfg.true_sequential)
        self.cfg = cfg

    def _quantize_set(self, lm: LoadedModel, mods: dict[str, nn.Module], acc: HessianAccumulator,
                      ctx: RunContext, own_H: bool = True) -> None:
        fmt = self.cfg.format
        masked = {n: m for n, m in mods.items() if getattr(m, "layer_tag", None) == "sparse"}
        if masked and acc.nsamples > 0:  # pruned earlier: plain GPTQ would refill the zeros
            for n, m in masked.items():
                self._quantize_masked(lm, n, m, acc, ctx)
            mods = {n: m for n, m in mods.items() if n not in masked}
            if not mods:
                return
        if len(mods) > 1 and not row_wise(fmt):  # one at a time; only the last may consume H
            for i, (n, m) in enumerate(mods.items()):
                self._quantize_set(lm, {n: m}, acc, ctx, own_H=i == len(mods) - 1)
            return
        Ws = {n: layer_weight(n, m) for n, m in mods.items()}  # each (out_i, in)
        if acc.nsamples == 0:
            for n, m in mods.items():
                ctx.warn(f"{n}: received no calibration tokens; quantised with RTN instead")
                qt = fmt.quantize(Ws[n])
                install_quantized(lm.module, n, m, qt)
                record_quantized(ctx, "rtn(fallback)", n, Ws[n], qt)
            return
        W = torch.cat(list(Ws.values()), 0) if len(Ws) > 1 else next(iter(Ws.values()))  # (sum out_i, in)
        row = 0
        for n in Ws:  # views into W: one copy of the weights stays alive, not two
            Ws[n], row = W[row:row + Ws[n].shape[0]], row + Ws[n].shape[0]
        live = acc.H.diagonal() != 0  # (in,) columns some calibration input reached
        den = {n: float(torch.einsum("oi,ij,oj->", w, acc.H, w)) for n, w in Ws.items()}  # tr(W H W^T)
        # H is handed over (factorised in place, freed early); the output error comes from GPTQ's loss
        res = gptq_quantize(W, acc.take_H() if own_H else acc.H, fmt, blocksize=self.cfg.blocksize,
                            percdamp=self.cfg.dampening_frac, act_order=self.cfg.act_order, own_H=own_H)
        row = 0
        for n, m in mods.items():
            rows = Ws[n].shape[0]
            qt, Q = res.qtensor.take_rows(row, row + rows), res.Q[row:row + rows]
            # tr(E H E^T) = 2 * OBS loss - damp * ||E||^2 over the live columns (see GPTQResult)
            e2 = float((Ws[n][:, live] - Q[:, live]).pow(2).sum())
            num = 2 * float(res.row_loss[row:row + rows].sum()) - res.damp_abs * e2
            row += rows
            for w in res.warnings:
                ctx.warn(f"{n}: {w}")
            install_quantized(lm.module, n, m, qt)
            record_quantized(ctx, "gptq", n, Ws[n], qt, Q, out_rel_error=(max(num, 0.0) / max(den[n], 1e-20)) ** 0.5)


    def _quantize_masked(self, lm: LoadedModel, name: str, module: nn.Module, acc: HessianAccumulator,
                         ctx: RunContext) -> None:
        """GPTQ that keeps an earlier stage's zeros: error feedback only into the kept weights.

        This is SparseGPT's joint pass with the mask fixed (OBS over the kept weights, pruned ones
        pinned to the exact-zero code), so ``prune -> gptq`` recipes keep their sparsity pattern.
        Activation order is not used on this path.
        """
        from ....sparsity.algos.sparsegpt.sparsegpt import sparsegpt_prune

        W = module.effective_weight().detach().to(torch.float32, copy=True)  # (out, in), zeros where pruned
        res = sparsegpt_prune(W, acc.H, module.pattern, blocksize=self.cfg.blocksize,
                              percdamp=self.cfg.dampening_frac, fmt=self.cfg.format, mask=module.mask)
        for w in res.warnings:
            ctx.warn(f"{name}: {w}")
        install_quantized(lm.module, name, module, res.qtensor)
        rec = record_quantized(ctx, "gptq", name, W, res.qtensor, res.W, out_rel_error=output_rel_error(W, res.W, acc.H))
        rec.notes.append(f"kept the earlier stage's zeros (sparsity {1 - float(res.mask.float().mean()):.4f}, "
                         f"{module.pattern.to_dict()}): OBS updates only into kept weights; act_order not used")


def gptq_stage(lm: LoadedModel, cfg: GPTQConfig) -> GPTQStage:
    return GPTQStage(cfg, [n for n, _ in select_layers(lm, cfg)])


METHODS.register("gptq")(MethodEntry(GPTQConfig, None, needs_calibration=True, block_stage=gptq_stage,
                                     summary="GPTQ: Hessian-aware rounding with error feedback"))
