"""SmoothQuant as a recipe stage: per-block activation maxima from the sequential engine, factors
folded into the ``norm -> linears`` mappings of the ``ArchSpec``, then W8A8 of the selected layers.

Only mappings whose previous op is a norm are smoothed (as in the paper); ``v_proj -> o_proj`` and
``up_proj -> down_proj`` are left alone. A norm whose output is not ``gamma * f(x) (+ beta)`` (Gemma's
``1 + gamma``, say) is detected by a numerical check and skipped with a warning.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from ....calib.capture import capture_inputs
from ....calib.stats import ActStatsAccumulator
from ....models.archspec import get_submodule
from ....models.layers import linear_weight
from ....models.loading import LoadedModel
from ....core.method import METHODS, LayerRecord, MethodConfig, MethodEntry, RunContext
from ....models.selection import layer_weight, select_layers
from ....calib.blocks import BlockInputs, last_module
from ...activation import ActQuantLinear, ActQuantSpec, install_int8, record_int8
from .smoothquant import fold_smoothing, smoothing_factors


class SmoothQuantConfig(MethodConfig):
    """SmoothQuant smoothing followed (by default) by W8A8 with dynamic per-token activations.

    Example:
        >>> SmoothQuantConfig(alpha=0.8).quantize
        True
    """

    method: Literal["smoothquant"] = "smoothquant"
    alpha: float = Field(0.5, ge=0, le=1, description="migration strength: share of difficulty moved to weights")
    quantize: bool = Field(True, description="after smoothing, replace selected linears by W8A8 ActQuantLinear")


@dataclass
class _Mapping:
    """One ``norm -> linears`` group of a block (full names)."""

    norm_name: str
    norm: nn.Module
    linears: list[tuple[str, nn.Module]]


class SmoothQuantStage:
    """Per-block observe (max |x| per channel) / apply (fold, then quantise) on the sequential engine."""

    def __init__(self, cfg: SmoothQuantConfig, selected: list[str]) -> None:
        self.cfg = cfg
        self.selected = set(selected)

    def process_block(self, lm: LoadedModel, index: int, block: nn.Module, prefix: str,
                      inputs: BlockInputs, ctx: RunContext) -> None:
        maps = self._mappings(lm, block, prefix, ctx)
        if maps:
            act_max = self._observe(maps, block, inputs)
            for mp in maps:
                self._smooth(mp, act_max[mp.linears[0][0]], ctx)
        if self.cfg.quantize:
            for name in sorted(n for n in self.selected if n.startswith(prefix + ".")):
                self._quantize(lm, name, ctx)

    def _mappings(self, lm: LoadedModel, block: nn.Module, prefix: str, ctx: RunContext) -> list[_Mapping]:
        """The block's ``norm -> linears`` mappings whose modules all exist and are still float."""
        out = []
        for prev, roles in lm.spec.scale_mappings if lm.spec else ():
            if prev not in lm.spec.norms:
                continue  # linear -> linear mappings: not part of SmoothQuant
            norm = get_submodule(block, lm.spec.norms[prev])
            lins = [(f"{prefix}.{lm.spec.roles[r]}", get_submodule(block, lm.spec.roles[r])) for r in roles]
            if norm is None or getattr(norm, "weight", None) is None or any(m is None for _, m in lins):
                continue
            if any(getattr(m, "is_compressed_linear", False) for _, m in lins):
                ctx.warn(f"{prefix}.{lm.spec.norms[prev]}: a following linear is already compressed; not smoothed")
                continue
            out.append(_Mapping(f"{prefix}.{lm.spec.norms[prev]}", norm, lins))
        return out

    def _observe(self, maps: list[_Mapping], block: nn.Module, inputs: BlockInputs) -> dict[str, torch.Tensor]:
        """max |x| per input channel of the first linear of each mapping (its siblings see the same x)."""
        firsts = {mp.linears[0][0]: mp.linears[0][1] for mp in maps}
        accs = {n: ActStatsAccumulator(linear_weight(m).shape[1]) for n, m in firsts.items()}
        with capture_inputs(firsts, lambda n, x: accs[n].update(x.float())):
            inputs.run(block, stop_before=last_module(block, firsts.values()))  # pre-hooks have seen it
        return {n: acc.max_abs for n, acc in accs.items()}

    def _smooth(self, mp: _Mapping, act_max: torch.Tensor, ctx: RunContext) -> None:
        """Fold ``s`` into the norm and the linears (the float function is unchanged)."""
        weights = [linear_weight(m) for _, m in mp.linears]  # each (out_i, in)
        s = smoothing_factors(act_max, weights, self.cfg.alpha)  # (in,)
        gamma, beta, new_ws = fold_smoothing(s, mp.norm.weight, getattr(mp.norm, "bias", None), weights)
        if not _fold_norm(mp.norm, gamma, beta, s):
            ctx.warn(f"{mp.norm_name}: output is not gamma * f(x) (+ beta); scales cannot be folded, not smoothed")
            return
        for (name, m), w in zip(mp.linears, new_ws):
            _write(linear_weight(m), w)
            if not self.cfg.quantize:
                note = f"smoothed after {mp.norm_name}, s in [{float(s.min()):.3g}, {float(s.max()):.3g}]"
                ctx.layers.append(LayerRecord(name, "smoothquant", notes=[note]))

    def _quantize(self, lm: LoadedModel, name: str, ctx: RunContext) -> None:
        module = lm.module.get_submodule(name)
        if getattr(module, "is_compressed_linear", False):
            ctx.warn(f"{name}: already compressed; left as is")
            return
        w = layer_weight(name, module)  # (out, in)
        new = install_int8(lm.module, name, ActQuantLinear.from_linear(module, ActQuantSpec()))
        record_int8(ctx, "smoothquant", name, w, new)


def _fold_norm(norm: nn.Module, gamma: torch.Tensor, beta: torch.Tensor | None, s: torch.Tensor) -> bool:
    """Write ``gamma`` (and ``beta``) into ``norm`` if that divides its output by ``s``; else restore it.

    Checked on a random probe, so a norm computing ``(1 + gamma) * f(x)`` is refused, not corrupted.
    """
    bias = getattr(norm, "bias", None)
    probe = torch.randn(4, s.numel(), generator=torch.Generator().manual_seed(0)).to(norm.weight)  # (4, in)
    expected = norm(probe).float() / s
    old = [norm.weight.detach().clone()] + ([bias.detach().clone()] if bias is not None else [])
    params = [norm.weight] + ([bias] if bias is not None else [])
    for p, v in zip(params, [gamma, beta]):
        _write(p, v)
    rtol = max(1e-3, 4 * torch.finfo(norm.weight.dtype).eps)  # the folded gamma is rounded to its dtype
    if torch.allclose(norm(probe).float(), expected, rtol=rtol, atol=1e-6):
        return True
    for p, v in zip(params, old):
        _write(p, v)
    return False


def _write(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy ``src`` into a parameter (or a view of one, e.g. HF Conv1D's transposed weight) in place."""
    with torch.no_grad():
        dst.copy_(src.to(dst.dtype))



def smoothquant_stage(lm: LoadedModel, cfg: SmoothQuantConfig) -> SmoothQuantStage:
    return SmoothQuantStage(cfg, [n for n, _ in select_layers(lm, cfg)])


METHODS.register("smoothquant")(MethodEntry(
    SmoothQuantConfig, None, needs_calibration=True, block_stage=smoothquant_stage,
    summary="SmoothQuant: migrate activation outliers into weights, then W8A8 (int8 weights, per-token int8 activations)"))

__all__ = ["SmoothQuantConfig", "SmoothQuantStage"]
