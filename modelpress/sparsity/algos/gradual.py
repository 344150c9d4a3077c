"""Gradual magnitude pruning while training (``method: gradual``), Zhu & Gupta (2017).

The masks tighten every ``dt`` optimizer steps from step ``t0`` over ``n`` pruning steps along the
cubic schedule

    s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3,   t in {t0, t0 + dt, ..., t0 + n dt},

and the model trains in between (against the float reference, see
:mod:`modelpress.distill.recover`), so the weights that remain learn to do the work of the pruned
ones. Scores are ``|W|`` of the weights as they are at the pruning step, per layer or over all
layers at once (``scope: global``). Pruned layers are :class:`~..layer.SparseLayer` from the start:
a pruned weight is exactly zero and so are its AdamW moments, so no optimizer step brings it back.

:class:`ScheduledMasks` is the training hook; movement pruning reuses it with another score.

Example recipe::

    stages:
      - method: gradual
        sparsity: 0.9
        schedule: {initial: 0.0, start: 0.0, end: 0.75, every: 10}
        train: {steps: 400, batch_size: 8, lr: 2.0e-4}
"""
from __future__ import annotations

from typing import Any, Callable, Literal

import torch
import torch.nn as nn
from pydantic import Field, model_validator

from ...core.config import Config
from ...core.errors import ModelpressError
from ...core.method import METHODS, MethodEntry, StageContext, StageKind
from ...distill.recover import (Losses, check_budget, stage_signature, train_against_reference, train_metrics,
                                uses_teacher)
from ...distill.trainer import TrainConfig
from ...models.loading import LoadedModel
from ..apply import install_pruned, record_pruned
from ..config import PruneConfig
from ..layer import SparseLayer, dense_weight
from ..masks import cubic_sparsity, global_masks
from ..patterns import NM, Unstructured
from .magnitude import magnitude_layers

#: (layer name, layer) -> weight-shaped scores, higher = keep
Scorer = Callable[[str, SparseLayer], torch.Tensor]


class CubicSchedule(Config):
    """Where the cubic schedule sits in the training run.

    ``start`` and ``end`` are fractions of the run's optimizer steps (``t0`` and ``t0 + n dt``), so
    one recipe fits any budget; ``every`` is ``dt`` in steps; ``initial`` is ``s_i`` (the final
    sparsity ``s_f`` is the stage's ``sparsity``).

    Example:
        >>> CubicSchedule(start=0.0, end=0.5, every=10).steps(100)
        (0, 10, 5)
    """

    initial: float = Field(0.0, ge=0.0, lt=1.0, description="s_i: sparsity at the first pruning step")
    start: float = Field(0.0, ge=0.0, lt=1.0, description="t0 as a fraction of the training steps")
    end: float = Field(0.75, gt=0.0, le=1.0, description="last pruning step (t0 + n dt) as a fraction of the steps")
    every: int = Field(10, ge=1, description="dt: optimizer steps between pruning steps")

    @model_validator(mode="after")
    def _ordered(self) -> "CubicSchedule":
        if self.end <= self.start:
            raise ValueError(f"end {self.end} must come after start {self.start}")
        return self

    def steps(self, total: int) -> tuple[int, int, int]:
        """(t0, dt, n) for a run of ``total`` optimizer steps: ``dt`` shrinks when the pruning window
        is shorter than one ``every``, so a short run still reaches the final sparsity."""
        t0 = round(self.start * total)
        t1 = max(t0 + 1, min(total, round(self.end * total)))
        dt = min(self.every, t1 - t0)
        return t0, dt, max(1, (t1 - t0) // dt)

    def prune_steps(self, total: int) -> list[int]:
        """The steps after which the masks are recomputed (0: before the first update)."""
        t0, dt, n = self.steps(total)
        return [t0 + i * dt for i in range(n + 1)]

    def sparsity_at(self, step: int, total: int, final: float) -> float:
        """The sparsity the masks hold after optimizer step ``step``: the cubic value at the last
        pruning step at or before it (0 before ``t0``)."""
        t0, dt, n = self.steps(total)
        if step < t0:
            return 0.0
        last = t0 + min(n, (step - t0) // dt) * dt
        return cubic_sparsity(last, final=final, initial=self.initial, start=t0, end=t0 + n * dt)


class ScheduledMasks:
    """Training hook: at each pruning step, tighten every layer's mask to the schedule's sparsity by
    ``score`` (monotone: a pruned weight stays pruned) and zero the optimizer's moments of the newly
    pruned weights, so pruned weights are exactly zero after every later update.

    ``per_output`` compares within each output row; ``scope: global`` one threshold over all layers.
    """

    def __init__(self, layers: dict[str, SparseLayer], schedule: CubicSchedule, final: float, total: int,
                 score: Scorer, *, scope: str = "layer", per_output: bool = False) -> None:
        self.layers, self.schedule, self.final, self.total = layers, schedule, final, total
        self.score, self.scope, self.per_output = score, scope, per_output
        self.when = set(schedule.prune_steps(total))

    def on_gradients(self, step: int, model: nn.Module) -> None:
        pass

    def on_step(self, step: int, model: nn.Module, optimizer: Any) -> None:
        if step in self.when:
            self.prune(self.schedule.sparsity_at(step, self.total, self.final), optimizer)

    @torch.no_grad()
    def prune(self, sparsity: float, optimizer: Any = None) -> None:
        """Tighten every mask to ``sparsity`` now."""
        if self.scope == "global":
            lowest = torch.finfo(torch.float32).min  # already pruned: below every real score
            scores = {n: torch.where(m.mask, self.score(n, m).float(), lowest) for n, m in self.layers.items()}
            for n, keep in global_masks(scores, sparsity).items():
                self.layers[n].set_mask(keep)
        else:
            for n, m in self.layers.items():
                m.update(self.score(n, m), sparsity, monotone=True, per_output=self.per_output)
        if optimizer is not None:
            zero_pruned_moments(optimizer, self.layers.values())

    def state_dict(self) -> dict[str, Any]:
        return {"masks": {n: m.mask.clone() for n, m in self.layers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for n, mask in state["masks"].items():
            self.layers[n].set_mask(mask)


def zero_pruned_moments(optimizer: Any, layers: Any) -> None:
    """Zero every weight-shaped optimizer state (AdamW's ``exp_avg``, ``exp_avg_sq``) at pruned
    positions: with zero moments and zero gradients, AdamW's update of a zero weight is exactly 0."""
    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    for m in layers:
        for v in opt.state.get(m.weight, {}).values():
            if torch.is_tensor(v) and v.shape == m.weight.shape:
                v.masked_fill_(~m.mask, 0)


class GradualConfig(PruneConfig):
    """Gradual magnitude pruning on the cubic schedule while training (see the module docstring)."""

    method: Literal["gradual"] = "gradual"
    scope: Literal["layer", "global"] = Field("layer", description="one threshold per layer or over all layers")
    per_output: bool = Field(False, description="unstructured: compare within each output row instead of the layer")
    schedule: CubicSchedule = CubicSchedule()
    losses: Losses = "auto"
    train: TrainConfig = TrainConfig(steps=400, batch_size=8, lr=2e-4)

    @model_validator(mode="after")
    def _schedulable(self) -> "GradualConfig":
        check_schedulable(self)
        return self


def check_schedulable(cfg: Any) -> None:
    """What a scheduled pruning config must satisfy, refused at recipe load with the values."""
    if isinstance(cfg.pattern, NM):
        raise ValueError(f"{cfg.method} cannot schedule pattern {cfg.pattern.to_dict()}: N:M fixes the sparsity and "
                         "a schedule needs a tunable one (unstructured or block); prune N:M once (magnitude) and "
                         "follow with recover")
    if cfg.scope == "global" and not isinstance(cfg.pattern, Unstructured):
        raise ValueError("global scope compares weights across layers: unstructured pattern only")
    if cfg.schedule.initial > cfg.target_sparsity():
        raise ValueError(f"schedule.initial {cfg.schedule.initial} is above the final sparsity "
                         f"{cfg.target_sparsity()}: a schedule only tightens masks")


def budget_steps(train: TrainConfig, seq_len: int, name: str) -> int:
    """Optimizer steps of the budget; a token budget smaller than one step is refused."""
    if train.steps is None and train.tokens is None:
        raise ModelpressError(f"{name}: the schedule needs a budget in steps or tokens (not minutes)")
    check_budget(train, seq_len, name)
    return train.total_steps(seq_len)


def sparse_layers(lm: LoadedModel, cfg: PruneConfig) -> dict[str, SparseLayer]:
    """The selected layers as SparseLayers (new ones keep every weight), installed in the model."""
    out = {}
    for n, m in magnitude_layers(lm, cfg):
        w, _, _ = dense_weight(m, n)
        keep = m.mask if isinstance(m, SparseLayer) else torch.ones_like(w, dtype=torch.bool)
        out[n] = install_pruned(lm.module, n, m, w, keep, cfg.pattern, "bitmask")
    return out


def finish_layers(lm: LoadedModel, cfg: PruneConfig, layers: dict[str, SparseLayer], ctx: StageContext,
                  note: str) -> None:
    """Report each pruned layer and, for ``storage: dense``, write the zeros into plain layers."""
    for n, m in layers.items():
        w = m.effective_weight().detach()
        rec = record_pruned(ctx, cfg.method, n, w, m.mask, cfg.pattern, storage=cfg.storage)
        rec.rel_error = None  # the weights were trained: there is no one-shot reconstruction error
        rec.notes.append(note)
        if cfg.storage == "dense":
            install_pruned(lm.module, n, m, w, m.mask, cfg.pattern, "dense")


def magnitude_score(name: str, layer: SparseLayer) -> torch.Tensor:
    return layer.weight.detach().abs()


def run_gradual(lm: LoadedModel, cfg: GradualConfig, ctx: StageContext) -> None:
    """Install all-kept SparseLayers, then train while the cubic schedule tightens their masks."""
    from ...distill.recover import training_data

    total = budget_steps(cfg.train, int(training_data(ctx, cfg.method).input_ids.shape[1]), cfg.method)
    layers = sparse_layers(lm, cfg)
    hooks = ScheduledMasks(layers, cfg.schedule, cfg.target_sparsity(), total, magnitude_score,
                           scope=cfg.scope, per_output=cfg.per_output)
    hooks.on_step(0, lm.module, None)  # t0 = 0: the initial sparsity before the first update
    result = train_against_reference(lm, ctx, cfg.losses, cfg.train, name=cfg.method, hooks=hooks,
                                     signature=stage_signature(cfg, ctx))
    train_metrics(cfg.method, result, ctx, prune_steps=sorted(hooks.when))
    finish_layers(lm, cfg, layers, ctx, f"gradual magnitude: {len(hooks.when)} pruning steps over "
                                        f"{result.steps} training steps")


METHODS.register("gradual")(MethodEntry(
    GradualConfig, run_gradual, kind=StageKind.TRAINING, grad=True, needs_training_data=True,
    needs_reference=lambda cfg: cfg is None or uses_teacher(cfg.losses),
    summary="gradual magnitude pruning while training, cubic schedule (Zhu & Gupta)"))
