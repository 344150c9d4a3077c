"""Magnitude pruning (``method: magnitude``): zero the smallest ``|W|``, layer-wise or globally.

Sparsity per layer is uniform, set per layer by selectors (``layer_sparsity``), or allocated by
OWL (Yin et al., 2024, "Outlier Weighed Layerwise sparsity"): each unit (a decoder block, or a
layer in a model without blocks) gets its outlier ratio ``D`` = fraction of its weights whose Wanda
score ``|W| * ||X||_2`` exceeds ``M`` times the unit's mean score; ``D`` is rescaled to
``[0, 2 lambda]`` and shifted so that the mean density is ``1 - S``, so units rich in outliers are
pruned less. OWL needs calibration data (one whole-model pass with input hooks).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field, model_validator

from ...calib.capture import capture_inputs
from ...calib.stats import ActStatsAccumulator
from ...core.errors import ModelpressError
from ...core.selectors import _matcher, select
from ...models.archspec import blocks_path, role_of
from ...models.loading import LoadedModel
from ...core.method import METHODS, MethodEntry, RunContext
from ...models.selection import check_finite
from ...quant.algos.ptq.ptq import calibration_batches, feed
from ..apply import install_pruned, record_pruned
from ..config import PruneConfig
from ..layer import dense_weight, prunable_layers
from ..masks import global_masks, mask_from_scores
from ..patterns import Unstructured, check_sparsity


class MagnitudeConfig(PruneConfig):
    """Magnitude pruning.

    Example:
        >>> MagnitudeConfig(sparsity=0.5, scope="global").scope
        'global'
    """

    method: Literal["magnitude"] = "magnitude"
    scope: Literal["layer", "global"] = Field("layer", description="one threshold per layer or over all layers")
    per_output: bool = Field(False, description="unstructured: compare within each output row instead of the layer")
    layer_sparsity: dict[str, float] = Field({}, description="selector -> sparsity; the first match wins")
    allocation: Literal["uniform", "owl"] = "uniform"
    owl_lambda: float = Field(0.08, gt=0, lt=0.5, description="OWL: densities spread over [-lambda, lambda]")
    owl_m: float = Field(5.0, gt=0, description="OWL: outlier = score above M times the unit's mean")
    batch_size: int = Field(8, gt=0, description="OWL calibration samples per forward")

    @model_validator(mode="after")
    def _compatible(self) -> "MagnitudeConfig":
        for sel, s in self.layer_sparsity.items():
            if not 0.0 <= s < 1.0:
                raise ValueError(f"layer_sparsity[{sel!r}] must lie in [0, 1), got {s}")
        if self.scope == "global" and not isinstance(self.pattern, Unstructured):
            raise ValueError("global scope compares weights across layers: unstructured pattern only")
        if self.scope == "global" and (self.layer_sparsity or self.allocation != "uniform"):
            raise ValueError("global scope sets one threshold: no layer_sparsity or owl allocation")
        if self.allocation == "owl" and self.layer_sparsity:
            raise ValueError("owl allocates the per-layer sparsity itself: drop layer_sparsity")
        return self


def magnitude_layers(lm: LoadedModel, cfg: PruneConfig) -> list[tuple[str, nn.Module]]:
    """Selected prunable layers (Linear, HF Conv1D, Conv2d), refusing already-quantised ones."""
    role_fn = lambda n: role_of(n, lm.module, lm.spec)  # noqa: E731
    layers = select(prunable_layers(lm.module), cfg.targets, cfg.ignore, role_fn)
    if not layers:
        raise ModelpressError(f"stage {cfg.method!r}: targets {cfg.targets} minus ignore {cfg.ignore} leave no layer")
    return layers


def run_magnitude(lm: LoadedModel, cfg: MagnitudeConfig, ctx: RunContext) -> None:
    """Prune every selected layer in place (data-free unless ``allocation: owl``)."""
    layers = magnitude_layers(lm, cfg)
    weights = {}
    for n, m in layers:
        w, _, _ = dense_weight(m, n)
        check_finite(n, w)
        weights[n] = w
    notes: dict[str, list[str]] = {}
    if cfg.scope == "global":
        masks = global_masks({n: w.abs() for n, w in weights.items()}, cfg.target_sparsity())
    else:
        sparsities, notes = layer_sparsities(lm, cfg, layers, weights, ctx)
        masks = {n: mask_from_scores(w.abs(), cfg.pattern, sparsities[n], layer=n, per_output=cfg.per_output)
                 for n, w in weights.items()}
    for n, m in ctx.iterate(layers, "magnitude"):
        # recorded first: weights[n] is a view of the layer's weight (no copy of the whole model is
        # held), which storage "dense" overwrites in place with the pruned weight
        rec = record_pruned(ctx, "magnitude", n, weights[n], masks[n], cfg.pattern, storage=cfg.storage)
        rec.notes.extend(notes.get(n, []))
        install_pruned(lm.module, n, m, weights[n], masks[n], cfg.pattern, cfg.storage)


def layer_sparsities(lm: LoadedModel, cfg: MagnitudeConfig, layers: list[tuple[str, nn.Module]],
                     weights: dict[str, torch.Tensor], ctx: RunContext
                     ) -> tuple[dict[str, float | None], dict[str, list[str]]]:
    """Sparsity of each layer (uniform, per-selector overrides, or OWL; N:M keeps its own) and notes."""
    if cfg.pattern.fixed_sparsity() is not None:
        return {n: None for n, _ in layers}, {}
    if cfg.allocation == "owl":
        return owl_layer_sparsities(lm, cfg, layers, weights, ctx)
    role_fn = lambda n: role_of(n, lm.module, lm.spec)  # noqa: E731
    rules = [(_matcher(sel, role_fn), s) for sel, s in cfg.layer_sparsity.items()]
    return {n: next((s for match, s in rules if match(n)), cfg.target_sparsity()) for n, _ in layers}, {}


# ---- OWL ----------------------------------------------------------------------------------------
def owl_sparsities(outlier_ratios: list[float], target: float, lam: float) -> list[float]:
    """OWL allocation: densities ``(D - min) / (max - min) * 2 lam``, shifted to mean ``1 - target``.

    Example:
        >>> [round(s, 2) for s in owl_sparsities([0.01, 0.02, 0.03], 0.5, 0.1)]
        [0.6, 0.5, 0.4]
    """
    D = torch.tensor(outlier_ratios, dtype=torch.float64)
    if D.numel() == 0 or float(D.max() - D.min()) == 0.0:
        return [target] * D.numel()
    dens = (D - D.min()) / (D.max() - D.min()) * (2 * lam)
    dens = dens - dens.mean() + (1.0 - target)
    return [float(1.0 - d) for d in dens]


def owl_layer_sparsities(lm: LoadedModel, cfg: MagnitudeConfig, layers: list[tuple[str, nn.Module]],
                         weights: dict[str, torch.Tensor], ctx: RunContext
                         ) -> tuple[dict[str, float], dict[str, list[str]]]:
    """Per-layer sparsity from OWL outlier ratios of units (decoder blocks, else single layers), and notes."""
    norms = input_norms(lm, layers, cfg.batch_size, ctx)
    units: dict[str, list[str]] = {}
    for n, _ in layers:
        units.setdefault(_unit_of(lm, n), []).append(n)
    ratios = []
    for names in units.values():
        scores = torch.cat([(weights[n].abs() * _col_norm(weights[n], norms[n])).reshape(-1) for n in names])
        ratios.append(float((scores > cfg.owl_m * scores.mean()).float().mean()))
    out, notes = {}, {}
    for (unit, names), s, r in zip(units.items(), owl_sparsities(ratios, cfg.target_sparsity(), cfg.owl_lambda), ratios):
        check_sparsity(s, unit)
        for n in names:
            out[n] = s
            notes[n] = [f"owl: {unit} outlier ratio {100 * r:.3f}% -> sparsity {s:.4f}"]
    return out, notes


def _unit_of(lm: LoadedModel, name: str) -> str:
    """The decoder block holding ``name`` (``model.layers.3``), or the layer itself."""
    prefix = blocks_path(lm.module, lm.spec) if lm.spec else None
    if prefix and name.startswith(prefix + "."):
        return ".".join(name.split(".")[: prefix.count(".") + 2])
    return name


def _col_norm(w: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """||X_j|| broadcast over the weight's columns (a Conv2d column j*kh*kw+... reads channel j)."""
    if w.dim() == 4:
        return norm.view(1, -1, 1, 1)
    return norm.view(1, -1)


@torch.no_grad()
def input_norms(lm: LoadedModel, layers: list[tuple[str, nn.Module]], batch_size: int,
                ctx: RunContext) -> dict[str, torch.Tensor]:
    """``||X_j||_2`` per input channel of every layer, from one whole-model calibration pass."""
    if ctx.calib is None:
        raise ModelpressError("magnitude with allocation: owl needs calibration data (--calib FILE)")
    accs = {}
    for n, m in layers:
        w, kind, conv = dense_weight(m, n)
        if kind == "conv2d" and conv.groups != 1:
            raise ModelpressError(f"{n}: owl allocation does not support grouped convolutions")
        accs[n] = ActStatsAccumulator(w.shape[1])

    def sink(n: str, x: torch.Tensor) -> None:
        accs[n].update(x.movedim(1, -1).float() if x.dim() == 4 else x.float())  # channels last

    with capture_inputs(dict(layers), sink):
        for batch in calibration_batches(ctx.calib, batch_size):
            feed(lm.module, batch)
    return {n: acc.l2_norm for n, acc in accs.items()}


METHODS.register("magnitude")(MethodEntry(MagnitudeConfig, run_magnitude,
                                          summary="magnitude pruning: layer-wise, global or OWL-allocated"))
