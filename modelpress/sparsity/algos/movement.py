"""Movement pruning while training (``method: movement``), Sanh, Wolf & Rush (2020).

Magnitude keeps the weights that are large; movement keeps the weights that training moves away
from zero. The first-order importance of weight ``W_ij`` accumulated over the optimizer steps is

    S_ij = - sum_t  W_ij^(t) * dL/dW_ij^(t)

(positive when the update grows ``|W_ij|``).

* ``variant: hard`` keeps the top-scored weights at the cubic schedule's sparsity (:mod:`.gradual`).
  With ``scores: learned`` (the paper's form) ``S`` is a parameter trained with Adam at ``score_lr``;
  each layer computes with ``W * TopV(S)``, the straight-through estimator passing
  ``dL/dS = dL/dW' * W`` for *every* weight, pruned ones included, so a pruned weight whose score
  climbs back comes back (with the value it had). With ``scores: accumulated`` ``S`` is the raw sum
  above, gathered in a training hook from each step's weight gradients; a pruned weight's gradient
  is zero, so its score stops moving and the masks only tighten.
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
from ...distill.trainer import TrainConfig, own_lr
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
    score_lr: float = Field(1e-2, gt=0.0, description="soft, hard with learned scores: learning rate of the scores")
    scores: Literal["accumulated", "learned"] = Field(
        "accumulated", description="hard: S summed from -W*dL/dW (masks only tighten) or learned with Adam through "
                                   "a straight-through top-v (the paper's; pruned weights can return)")
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
        if self.learned and (not isinstance(self.pattern, Unstructured) or self.scope == "global"):
            raise ValueError("learned hard scores pick the top-v weights of each layer (or row): unstructured, "
                             "layer scope only")
        return self

    @property
    def learned(self) -> bool:
        """Whether the scores are parameters trained through a straight-through mask."""
        return self.variant == "soft" or self.scores == "learned"


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


class _TopVSTE(torch.autograd.Function):
    """The top ``1 - sparsity`` scores (of the whole layer, or of each row) forward; the gradient passes
    straight through to ``S``."""

    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor, sparsity: float, per_output: bool) -> torch.Tensor:
        return top_v(scores, sparsity, per_output).to(scores.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad, None, None


def top_v(scores: torch.Tensor, sparsity: float, per_output: bool = False) -> torch.Tensor:
    """Boolean mask of the ``round((1 - sparsity) * n)`` highest scores (per row with ``per_output``)."""
    flat = scores.detach().reshape(scores.shape[0], -1) if per_output else scores.detach().reshape(1, -1)
    k = flat.shape[1] - round(sparsity * flat.shape[1])
    keep = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        keep.scatter_(1, flat.topk(k, dim=1).indices, True)
    return keep.reshape(scores.shape)


class MovementLayer(nn.Module):
    """Training-time form of a SparseLayer with learned movement scores: computes with
    ``W * mask * M(S)``, ``M`` the soft threshold ``sigmoid(S) > tau`` or the hard top-v at ``sparsity``
    (``rule``); ``S`` trains in an optimizer group of its own at ``lr`` (the paper's 1e-2 beside the
    weights' 3e-5), with its true gradient, so the global clip sees what the paper's does."""

    def __init__(self, layer: SparseLayer, init: float, lr: float, rule: str = "threshold",
                 per_output: bool = False) -> None:
        super().__init__()
        if layer.kind == "conv2d":
            raise ModelpressError("movement pruning with learned scores takes linear layers, not Conv2d")
        self.inner, self.rule, self.per_output = layer, rule, per_output
        self.tau, self.sparsity = 0.0, 0.0  # the threshold rule's tau; the top-v rule's sparsity
        self.score = own_lr(nn.Parameter(torch.full_like(layer.weight, init, dtype=torch.float32)), lr)

    def scores(self) -> torch.Tensor:
        return self.score

    def _mask(self, s: torch.Tensor) -> torch.Tensor:
        if self.rule == "topv":
            return _TopVSTE.apply(s, self.sparsity, self.per_output)
        return _ThresholdSTE.apply(s, self.tau)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self._mask(self.scores())  # (out, in)
        w = (self.inner.effective_weight() * mask).to(x.dtype)
        b = self.inner.bias.to(x.dtype) if self.inner.bias is not None else None
        return F.linear(x, w, b)

    def keep(self) -> torch.Tensor:
        s = self.scores().detach()
        mine = top_v(s, self.sparsity, self.per_output) if self.rule == "topv" else torch.sigmoid(s) > self.tau
        return mine & self.inner.mask


class SoftThreshold:
    """Training hook of movement pruning with learned scores: the soft rule's ``tau`` follows the cubic
    schedule from 0 to ``threshold``, the hard top-v rule's sparsity the cubic schedule to the final
    sparsity (the layers' scores are parameters, checkpointed with the model)."""

    def __init__(self, layers: dict[str, MovementLayer], schedule: CubicSchedule, threshold: float,
                 total: int, final_sparsity: float | None = None) -> None:
        self.layers, self.schedule, self.threshold, self.total = layers, schedule, threshold, total
        self.final_sparsity = final_sparsity
        #: (step, fraction of the weights kept before the step that the step's update dropped): learned
        #: masks can swap weights at every step, and a mask still churning at the end has not settled
        self.churn: list[tuple[int, float]] = []
        self._kept: dict[str, torch.Tensor] | None = None
        self.set(0)

    def set(self, step: int) -> None:
        self.step = step
        if self.final_sparsity is not None:
            sparsity = self.schedule.sparsity_at(step, self.total, self.final_sparsity)
            for m in self.layers.values():
                m.sparsity = sparsity
            return
        t0, dt, n = self.schedule.steps(self.total)
        last = t0 + min(n, max(0, step - t0) // dt) * dt
        tau = cubic_sparsity(last, final=self.threshold, initial=0.0, start=t0, end=t0 + n * dt)
        for m in self.layers.values():
            m.tau = tau

    def on_gradients(self, step: int, model: nn.Module) -> None:
        pass

    def on_step(self, step: int, model: nn.Module, optimizer: Any) -> None:
        kept = {n: m.keep() for n, m in self.layers.items()}  # the masks the step's update left
        if self._kept is not None:
            before = sum(int(k.sum()) for k in self._kept.values())
            dropped = sum(int((self._kept[n] & ~kept[n]).sum()) for n in kept)
            self.churn.append((step, dropped / before if before else 0.0))
        rule = [(m.sparsity, m.tau) for m in self.layers.values()]
        self.set(step)
        unchanged = rule == [(m.sparsity, m.tau) for m in self.layers.values()]
        # the masks the next step computes with
        self._kept = kept if unchanged else {n: m.keep() for n, m in self.layers.items()}

    def churn_summary(self) -> dict[str, float]:
        """Mean churn over the last fifth of the steps and over the steps at the final sparsity or tau."""
        if not self.churn:
            return {}
        tail = [c for _, c in self.churn[-max(1, len(self.churn) // 5):]]
        t0, dt, n = self.schedule.steps(self.total)
        final = [c for s, c in self.churn if s > t0 + n * dt]
        return {"mask_churn_last_fifth": sum(tail) / len(tail),
                **({"mask_churn_at_final": sum(final) / len(final)} if final else {})}

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "churn": list(self.churn)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.churn = [tuple(c) for c in state.get("churn", [])]
        self._kept = None
        self.set(int(state["step"]))


def _learned(lm: LoadedModel, cfg: MovementConfig, layers: dict[str, SparseLayer], total: int, ctx: StageContext):
    """Train with learned scores: soft (threshold + L1 penalty) or hard (top-v on the cubic schedule)."""
    hard = cfg.variant == "hard"
    wrapped = {n: MovementLayer(m, cfg.score_init, cfg.score_lr, "topv" if hard else "threshold", cfg.per_output)
               for n, m in layers.items()}
    for n, w in wrapped.items():
        set_submodule(lm.module, n, w)
    hooks = SoftThreshold(wrapped, cfg.schedule, cfg.threshold, total, cfg.target_sparsity() if hard else None)

    def penalty() -> torch.Tensor:  # Sanh et al.: L1 of sigmoid(S), averaged per layer then over layers
        return cfg.regularization * torch.stack([torch.sigmoid(w.scores()).mean() for w in wrapped.values()]).mean()

    result = train_against_reference(lm, ctx, cfg.losses, cfg.train, name=cfg.method, hooks=hooks,
                                     regulariser=None if hard else penalty, signature=stage_signature(cfg, ctx))
    for n, w in wrapped.items():
        w.inner.set_mask(w.keep())
        set_submodule(lm.module, n, w.inner)
    return result, hooks


def run_movement(lm: LoadedModel, cfg: MovementConfig, ctx: StageContext) -> None:
    """Train while movement scores decide the masks; the result is SparseLayer pruning."""
    total = budget_steps(cfg.train, int(training_data(ctx, cfg.method).input_ids.shape[1]), cfg.method)
    layers = sparse_layers(lm, cfg)
    churn: dict[str, float] = {}
    if cfg.learned:
        result, learned = _learned(lm, cfg, layers, total, ctx)
        churn = learned.churn_summary()
    else:
        hooks = MovementScores(layers, cfg.schedule, cfg.target_sparsity(), total, scope=cfg.scope,
                               per_output=cfg.per_output)
        result = train_against_reference(lm, ctx, cfg.losses, cfg.train, name=cfg.method, hooks=hooks,
                                         signature=stage_signature(cfg, ctx))
    sparsity = sum(int((~m.mask).sum()) for m in layers.values()) / max(1, sum(m.mask.numel() for m in layers.values()))
    train_metrics(cfg.method, result, ctx, variant=cfg.variant, sparsity=sparsity, **churn)
    finish_layers(lm, cfg, layers, ctx, f"movement ({cfg.variant}): {result.steps} training steps")


METHODS.register("movement")(MethodEntry(
    MovementConfig, run_movement, kind=StageKind.TRAINING, grad=True, needs_training_data=True,
    needs_reference=lambda cfg: cfg is None or uses_teacher(cfg.losses),
    summary="movement pruning while training, hard (top-v, cubic schedule) or soft (learned scores) (Sanh et al.)"))
