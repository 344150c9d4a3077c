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
from ....pipeline.sequential import BlockInputs, SubInputs, common_ancestor, last_module
from ...apply import install_quantized, record_quantized
from ...fields import FormatField
from ...formats import IntFormat, QTensor, WeightFormat
from ...granularity import PerGroup, PerTensor
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
        groups = self._groups(lm, prefix, names)
        replay: tuple[str, nn.Module, SubInputs] | None = None  # (name, submodule, its recorded inputs)
        for k, group in enumerate(groups):
            mods = {n: lm.module.get_submodule(n) for n in group}
            sets = self._shared_input_sets(lm, prefix, group)  # q/k/v read one tensor: one Hessian
            accs = {s[0]: HessianAccumulator(layer_weight(s[0], mods[s[0]]).shape[1]) for s in sets}
            stop = last_module(block, [mods[n] for n in accs])
            with capture_inputs({n: mods[n] for n in accs}, lambda n, x: accs[n].update(x.float())):
                if replay is not None and _inside(replay[0], group):
                    replay[2].run(replay[1], stop_before=stop)  # e.g. only the MLP, not the whole block
                else:
                    nxt = groups[k + 1] if k + 1 < len(groups) else []
                    target = _replay_target(lm, block, prefix, group + nxt, inputs) if nxt else None
                    sub = inputs.run(block, stop_before=stop, record=target and target[1])
                    replay = (*target, sub) if target and sub is not None else None
            for names_ in sets:  # (replaces the layers by quantised ones: compare by name below)
                self._quantize_set(lm, {n: mods[n] for n in names_}, accs.pop(names_[0]), ctx)  # H freed after
            if replay is not None and not _inside(replay[0], group):
                replay = None  # a layer outside the recorded module changed: its inputs are stale

    def _shared_input_sets(self, lm: LoadedModel, prefix: str, group: list[str]) -> list[list[str]]:
        """Split ``group`` into sets of layers that read the same input (from the ArchSpec mappings).

        Layers of one set share a Hessian and, for row-wise formats, are quantised as one stacked
        matrix: GPTQ treats rows independently, so stacking gives the same codes in one column loop.
        """
        spec, left, sets = lm.spec, list(group), []
        for _prev, roles in (spec.scale_mappings if spec else ()):
            s = [n for n in (f"{prefix}.{spec.roles[r]}" for r in roles if r in spec.roles) if n in left]
            if len(s) > 1:
                sets.append(s)
                left = [n for n in left if n not in s]
        return sets + [[n] for n in left]

    def _quantize_set(self, lm: LoadedModel, mods: dict[str, nn.Module], acc: HessianAccumulator,
                      ctx: RunContext) -> None:
        fmt = self.cfg.format
        if len(mods) > 1 and not _row_wise(fmt):
            for n, m in mods.items():
                self._quantize_set(lm, {n: m}, acc, ctx)
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
        res = gptq_quantize(W, acc.take_H(), fmt, blocksize=self.cfg.blocksize, percdamp=self.cfg.dampening_frac,
                            act_order=self.cfg.act_order, own_H=True)
        row = 0
        for n, m in mods.items():
            rows = Ws[n].shape[0]
            qt, Q = _take_rows(res.qtensor, row, row + rows), res.Q[row:row + rows]
            # tr(E H E^T) = 2 * OBS loss - damp * ||E||^2 over the live columns (see GPTQResult)
            e2 = float((Ws[n][:, live] - Q[:, live]).pow(2).sum())
            num = 2 * float(res.row_loss[row:row + rows].sum()) - res.damp_abs * e2
            row += rows
            for w in res.warnings:
                ctx.warn(f"{n}: {w}")
            install_quantized(lm.module, n, m, qt)
            record_quantized(ctx, "gptq", n, Ws[n], qt, Q, out_rel_error=(max(num, 0.0) / max(den[n], 1e-20)) ** 0.5)


def _inside(parent: str, names: list[str]) -> bool:
    return all(n.startswith(parent + ".") for n in names)


#: Replay a submodule only while its recorded inputs stay this small (they sit in RAM).
REPLAY_MAX_BYTES = 2 << 30


def _replay_target(lm: LoadedModel, block: nn.Module, prefix: str, names: list[str],
                   inputs: BlockInputs) -> tuple[str, nn.Module] | None:
    """The submodule whose inputs to record now so the next group's pass can replay just it.

    True-sequential GPTQ observes each group on the block with the earlier groups already
    quantised. When this group and the next (``names``) lie in one submodule (q/k/v then o in
    the attention, gate/up then down in the MLP), that submodule's inputs do not depend on
    them, so the next pass can start from its recorded inputs instead of from the block's.
    """
    if inputs.on_disk or inputs.hidden.numel() * inputs.hidden.element_size() > REPLAY_MAX_BYTES:
        return None
    target = common_ancestor(block, [lm.module.get_submodule(n) for n in names])
    if target is None:
        return None
    rel = next(n for n, m in block.named_modules() if m is target)
    return f"{prefix}.{rel}", target


def _row_wise(fmt: WeightFormat) -> bool:
    """Every parameter of ``fmt`` belongs to one row (no tensor-wide scale), so rows can be stacked."""
    return fmt.type == "int" and not isinstance(fmt.granularity, PerTensor)


def _take_rows(qt: QTensor, a: int, b: int) -> QTensor:
    """Rows ``a:b`` of a row-wise quantised tensor."""
    return QTensor(qt.fmt, (b - a, qt.shape[1]), qt.codes[a:b].contiguous(),
                   {k: v[a:b].contiguous() for k, v in qt.params.items()})


def _output_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """Relative output error on the calibration inputs: sqrt(tr(E H E^T) / tr(W H W^T))."""
    E = W - Q
    num = torch.einsum("oi,ij,oj->", E, H, E)
    den = torch.einsum("oi,ij,oj->", W, H, W).clamp_min(1e-20)
    return float((num / den).clamp_min(0).sqrt())



def gptq_stage(lm: LoadedModel, cfg: GPTQConfig) -> GPTQStage:
    return GPTQStage(cfg, [n for n, _ in select_layers(lm, cfg)])


METHODS.register("gptq")(MethodEntry(GPTQConfig, None, needs_calibration=True, block_stage=gptq_stage,
                                     summary="GPTQ: Hessian-aware rounding with error feedback"))
