"""GPTQ as a recipe stage: Hessians from the sequential engine's hooks, maths in ``gptq.py``."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from ....calib.capture import capture_inputs
from ....calib.stats import HessianAccumulator
from ....models.loading import LoadedModel
from ....pipeline.methods import METHODS, MethodConfig, MethodEntry, RunContext, layer_weight, select_layers
from ....pipeline.sequential import BlockInputs
from ...apply import install_quantized, record_quantized
from ...fields import FormatField
from ...formats import IntFormat
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
    offload_hessians: bool = False


class GPTQStage:
    """Per-block observe/apply for GPTQ on the sequential engine."""

    def __init__(self, cfg: GPTQConfig, selected: list[str]) -> None:
        self.cfg = cfg
        self.selected = set(selected)

    def _groups(self, lm: LoadedModel, prefix: str, names: list[str]) -> list[list[str]]:
        if not self.cfg.true_sequential or lm.spec is None or not lm.spec.sequential:
            return [names]
        groups, placed = [], set()
        for roles in lm.spec.sequential:
            g = [f"{prefix}.{lm.spec.roles[r]}" for r in roles if f"{prefix}.{lm.spec.roles[r]}" in names]
            placed.update(g)
            if g:
                groups.append(g)
        rest = [n for n in names if n not in placed]
        return groups + ([rest] if rest else [])

    def process_block(self, lm: LoadedModel, index: int, block: nn.Module, prefix: str,
                      inputs: BlockInputs, ctx: RunContext) -> None:
        names = [n for n in sorted(self.selected) if n.startswith(prefix + ".")]
        for group in self._groups(lm, prefix, names):
            mods = {n: lm.module.get_submodule(n) for n in group}
            accs = {n: HessianAccumulator(layer_weight(n, m).shape[1]) for n, m in mods.items()}
            with capture_inputs(mods, lambda n, x: accs[n].update(x.float())):
                inputs.run(block, stop_after=_last_module(block, mods))
            for n, m in mods.items():
                self._quantize_layer(lm, n, m, accs[n], ctx)

    def _quantize_layer(self, lm: LoadedModel, name: str, module: nn.Module, acc: HessianAccumulator,
                        ctx: RunContext) -> None:
        W = layer_weight(name, module)  # (out, in)
        if acc.nsamples == 0:
            ctx.warn(f"{name}: received no calibration tokens; quantised with RTN instead")
            qt = self.cfg.format.quantize(W)
            install_quantized(lm.module, name, module, qt)
            record_quantized(ctx, "rtn(fallback)", name, W, qt)
            return
        H = acc.H
        res = gptq_quantize(W, H, self.cfg.format, blocksize=self.cfg.blocksize,
                            percdamp=self.cfg.dampening_frac, act_order=self.cfg.act_order)
        for w in res.warnings:
            ctx.warn(f"{name}: {w}")
        E = W - res.Q
        out_err = float((torch.einsum("oi,ij,oj->", E, H, E) / torch.einsum("oi,ij,oj->", W, H, W).clamp_min(1e-20)).clamp_min(0).sqrt())
        install_quantized(lm.module, name, module, res.qtensor)
        record_quantized(ctx, "gptq", name, W, res.qtensor, res.Q, out_rel_error=out_err)


def _last_module(block: nn.Module, mods: dict[str, nn.Module]) -> nn.Module | None:
    """The module of ``mods`` registered last in ``block`` (forward can stop after it)."""
    wanted = {id(m) for m in mods.values()}
    last = None
    for m in block.modules():
        if id(m) in wanted:
            last = m
    return last


def gptq_stage(lm: LoadedModel, cfg: GPTQConfig) -> GPTQStage:
    return GPTQStage(cfg, [n for n, _ in select_layers(lm, cfg)])


METHODS.register("gptq")(MethodEntry(GPTQConfig, None, needs_calibration=True, block_stage=gptq_stage,
                                     summary="GPTQ: Hessian-aware rounding with error feedback"))
