"""Swapping a layer for its quantised version and recording what was done (shared by all quantisers)."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..models.layers import set_submodule
from ..core.method import LayerRecord, RunContext
from .formats.base import QTensor, WeightFormat
from .granularity import PerGroup, fitting_group_sizes, group_layout
from .qlinear import QuantLinear


def group_note(name: str, fmt: WeightFormat, in_features: int) -> str | None:
    """Message for a layer whose width is not a multiple of the group size (last group is shorter)."""
    if not isinstance(fmt.granularity, PerGroup) or in_features % fmt.granularity.size == 0:
        return None
    n, last = group_layout(in_features, fmt.granularity.size)
    fits = ", ".join(map(str, fitting_group_sizes(in_features))) or "none of 16..256"
    return (f"{name}: in_features {in_features} is not a multiple of group {fmt.granularity.size}; "
            f"last of {n} groups has {last} columns (group sizes that divide it: {fits})")


def install_quantized(model: nn.Module, name: str, module: nn.Module, qt: QTensor) -> QuantLinear:
    """Replace ``module`` (Linear or HF Conv1D) called ``name`` by a QuantLinear holding ``qt``."""
    bias = getattr(module, "bias", None)
    new = QuantLinear.from_linear_weight(qt, bias.detach() if bias is not None else None)
    set_submodule(model, name, new)
    return new


def record_quantized(ctx: RunContext, method: str, name: str, w: torch.Tensor, qt: QTensor,
                     q: torch.Tensor | None = None, **extra) -> LayerRecord:
    """Append the per-layer row: format, true bits per weight, relative weight error."""
    q = qt.dequantize() if q is None else q
    rel = float((w - q).norm() / w.norm().clamp_min(1e-12))
    rec = LayerRecord(name, method, qt.fmt.to_dict(), tuple(qt.shape), qt.bits_per_weight(), rel, **extra)
    note = group_note(name, qt.fmt, qt.shape[1])
    if note:
        rec.notes.append(note)
        ctx.warn(note)
    ctx.layers.append(rec)
    return rec

