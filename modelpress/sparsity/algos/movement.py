"""Movement pruning while training (``method: movement``), Sanh, Wolf & Rush (2020).

Magnitude keeps the weights that are large; movement keeps the weights that training moves away
from zero. The first-order importance of weight ``W_ij`` accumulated over the optimizer steps is

    S_ij = - sum_t  W_ij^(t) * dL/dW_ij^(t)

(positive when the update grows ``|W_ij|``).

* ``variant: hard``: ``S`` accumulates in a training hook from each step's gradients, and the masks
  keep the top-scored weights at the cubic schedule's sparsity (:mod:`.gradual`), monotone: a pruned
  weight is zero, so its score stops moving and it stays pruned.
* ``variant: soft``: ``S`` is learned. Each layer computes with ``W * (sigmoid(S) > tau)``, the
  straight-through estimator passing ``dL/dmask = dL/dW' * W`` to ``S`` (so ``S`` follows the same
  ``-W * grad`` direction), the threshold ``tau`` rises along the cubic schedule to ``threshold``,
  and ``regularization * mean(sigmoid(S))`` pushes scores down: the sparsity is what the penalty
  buys, not a target.

Either way the final masks become ordinary :class:`~..layer.SparseLayer` pruning, so saving,
reloading and export work as for magnitude pruning.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, model_validator

from ...core.errors import ModelpressError
from ...core.method import METHODS, MethodEntry, StageContext, StageKind
from ...distill.recover import (Losses, stage_signature, train_against_reference, train_metrics, training_data,
                                uses_teacher)
from ...distill.trainer import TrainConfig
from ...models.layers import set_submodule
from ...models.loading import LoadedModel
from ..config import PruneConfig
from ..layer import SparseLayer
from ..masks import cubic_sparsity
from ..patterns import Unstructured
from .gradual import CubicSchedule, ScheduledMasks, budget_steps, check_schedulable, finish_layers, sparse_layers


class MovementConfig(PruneConfig):
    """Movement pruning (see the module docstring)."""

    method: Literal["movement"] = "movement"
    variant: Literal["hard", "soft"] = "hard"
    scope: Literal["layer", "global"] = Field("layer", description="hard: top-v per layer or over all layers")
    per_output: bool = Field(False, description="hard, unstructured: compare within each output row")
    schedule: CubicSchedule = CubicSchedule()
    threshold: float = Field(0.1, gt=0.0, lt=1.0, description="soft: final tau on sigmoid(S)")
    regularization: float = Field(1.0, ge=0.0, description="soft: weight of mean(sigmoid(S)) in the loss")
    score_init: float = Field(0.0, description="soft: initial S (sigmoid(0) = 0.5 keeps every weight)")
    score_lr: float = Field(1e-2, gt=0.0, description="soft: learning rate of the scores")
    losses: Losses = "auto"
    train: TrainConfig = TrainConfig(steps=400, batch_size=8, lr=2e-4)

    @model_validator(mode="after")
    def _consistent(self) -> "MovementConfig":
        check_schedulable(self)
        if self.variant == "hard" and self.schedule.initial > 0 and self.schedule.start == 0:
            raise ValueError(f"schedule.initial {self.schedule.initial} at start 0 would prune on scores not yet "
                             "accumulated: set schedule.start > 0 or initial 0")
        if self.variant == "soft" and (not isinstance(self.pattern, Unstructured) or self.scope == "global"):
            raise ValueError("the soft variant thresholds each weight's own score: unstructured, layer scope only")
        return self


# ---- hard: scores accumulated in a hook -----------------------------------------------------------
class MovementScores(ScheduledMasks):
    """:class:`ScheduledMasks` whose score is the accumulated ``-W * grad`` of every weight."""

    def __init__(self, layers: dict[str, SparseLayer], schedule: CubicSchedule, final: float, total: int, *,
                 scope: str = "layer", per_output: bool = False) -> None:
        super().__init__(layers, schedule, final, total, self._score, scope=scope, per_output=per_output)
        self.scores = {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in layers.items()}

    @torch.no_grad()
    def on_gradients(self, step: int, model: nn.Module) -> None:
        for n, m in self.layers.items():
            if m.weight.grad is not None:
                self.scores[n].sub_(m.weight.detach().float() * m.weight.grad.float())

    def _score(self, name: str, layer: SparseLayer) -> torch.Tensor:
        return self.scores[name]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "scores": {n: s.clone() for n, s in self.scores.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for n, s in state["scores"].items():
            self.scores[n].copy_(s)


# ---- soft: learned scores -------------------------------------------------------------------------
class _ThresholdSTE(torch.autograd.Function):
    """``sigmoid(S) > tau`` forward; the gradient passes straight through to ``S``."""

    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor, tau: float) -> torch.Tensor:
        return (torch.sigmoid(scores) > tau).to(scores.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class MovementLayer(nn.Module):
    """Training-time form of a SparseLayer under soft movement pruning: computes with
    ``W * mask * (sigmoid(S) > tau)``; ``S = scale * raw`` so the scores learn at ``scale`` times the
    weights' rate under Adam (whose step does not depend on the gradient's size)."""

    def __init__(self, layer: SparseLayer, init: float, scale: float) -> None:
        super().__init__()
        if layer.kind == "conv2d":
            raise ModelpressError("soft movement pruning takes linear layers, not Conv2d")
        self.inner, self.scale, self.tau = layer, scale, 0.0
        self.raw = nn.Parameter(torch.full_like(layer.weight, init / scale, dtype=torch.float32))

    def scores(self) -> torch.Tensor:
        return self.raw * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = _ThresholdSTE.apply(self.scores(), self.tau)  # (out, in)
        w = (self.inner.effective_weight() * mask).to(x.dtype)
        b = self.inner.bias.to(x.dtype) if self.inner.bias is not None else None
        return F.linear(x, w, b)

    def keep(self) -> torch.Tensor:
        return (torch.sigmoid(self.scores().detach()) > self.tau) & self.inner.mask


class SoftThreshold:
    """Training hook of soft movement pruning: ``tau`` follows the cubic schedule from 0 to
    ``threshold`` (the layers' scores are parameters, checkpointed with the model)."""

    def __init__(self, layers: dict[str, MovementLayer], schedule: CubicSchedule, threshold: float,
                 total: int) -> None:
        self.layers, self.schedule, self.threshold, self.total = layers, schedule, threshold, total
        self.set(0)

    def set(self, step: int) -> None:
        self.step = step
        t0, dt, n = self.schedule.steps(self.total)
        last = t0 + min(n, max(0, step - t0) // dt) * dt
        tau = cubic_sparsity(last, final=self.threshold, initial=0.0, start=t0, end=t0 + n * dt)
        for m in self.layers.values():
            m.tau = tau

    def on_gradients(self, step: int, model: nn.Module) -> None:
        pass

    def on_step(self, step: int, model: nn.Module, optimizer: Any) -> None:
        self.set(step)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.set(int(state["step"]))


def _soft(lm: LoadedModel, cfg: MovementConfig, layers: dict[str, SparseLayer], total: int, ctx: StageContext):
    wrapped = {n: MovementLayer(m, cfg.score_init, cfg.score_lr / cfg.train.lr) for n, m in layers.items()}
    for n, w in wrapped.items():
        set_submodule(lm.module, n, w)
    hooks = SoftThreshold(wrapped, cfg.schedule, cfg.threshold, total)

    def penalty() -> torch.Tensor:  # Sanh et al.: L1 of sigmoid(S), averaged per layer then over layers
        return cfg.regularization * torch.stack([torch.sigmoid(w.scores()).mean() for w in wrapped.values()]).mean()

    result = train_against_reference(lm, ctx, cfg.losses, cfg.train, name=cfg.method, hooks=hooks,
                                     regulariser=penalty, signature=stage_signature(cfg, ctx))
    for n, w in wrapped.items():
        w.inner.set_mask(w.keep())
        set_submodule(lm.module, n, w.inner)
    return result, hooks


def run_movement(lm: LoadedModel, cfg: MovementConfig, ctx: StageContext) -> None:
    """Train while movement scores decide the masks; the result is SparseLayer pruning."""
    total = budget_steps(cfg.train, int(training_data(ctx, cfg.method).input_ids.shape[1]), cfg.method)
    layers = sparse_layers(lm, cfg)
    if cfg.variant == "soft":
        result, _ = _soft(lm, cfg, layers, total, ctx)
    else:
        hooks = MovementScores(layers, cfg.schedule, cfg.target_sparsity(), total, scope=cfg.scope,
                               per_output=cfg.per_output)
        result = train_against_reference(lm, ctx, cfg.losses, cfg.train, name=cfg.method, hooks=hooks,
                                         signature=stage_signature(cfg, ctx))
    sparsity = sum(int((~m.mask).sum()) for m in layers.values()) / max(1, sum(m.mask.numel() for m in layers.values()))
    train_metrics(cfg.method, result, ctx, variant=cfg.variant, sparsity=sparsity)
    finish_layers(lm, cfg, layers, ctx, f"movement ({cfg.variant}): {result.steps} training steps")


METHODS.register("movement")(MethodEntry(
    MovementConfig, run_movement, kind=StageKind.TRAINING, grad=True, needs_training_data=True,
    needs_reference=lambda cfg: cfg is None or uses_teacher(cfg.losses),
    summary="movement pruning while training, hard (top-v, cubic schedule) or soft (learned scores) (Sanh et al.)"))
