"""Lottery-ticket rewinding (``method: lottery``), Frankle & Carbin (2019), Frankle et al. (2020).

1. Train ``k = rewind_step`` optimizer steps and record every parameter (the rewind point);
2. keep training to step ``P = prune_at * steps``;
3. prune by magnitude (per layer or globally) to ``sparsity``;
4. rewind: every parameter goes back to its step-``k`` value, the pruned weights to zero (the
   "winning ticket": the step-``k`` network under the mask);
5. retrain the ticket with the mask fixed for the remaining ``steps - P`` steps (fresh optimizer and
   schedule).

``k = 0`` is the original lottery ticket (rewind to the starting weights); a small ``k`` is the
rewinding that Frankle et al. (2020) found stable for larger networks. ``reinit: true`` is the
paper's control: step 4 gives every parameter a fresh random draw from the model's own initialiser
(seeded by ``reinit_seed``) instead of its step-``k`` value, under the identical masks, and step 5
is unchanged; the ticket should beat it. Both phases train against the float reference
(:mod:`modelpress.distill.recover`), or on hard labels alone with ``losses: [{type: ce}]`` (no
teacher: training from scratch). A killed run resumes in either phase: the rewind point rides in
phase 1's checkpoint, and the ticket is written before phase 2 starts.

Example recipe::

    stages:
      - {method: lottery, sparsity: 0.8, rewind_step: 20, prune_at: 0.5, train: {steps: 400, batch_size: 8}}

Its control, run separately from the same starting model (identical masks, fresh weights)::

    stages:
      - {method: lottery, sparsity: 0.8, rewind_step: 20, prune_at: 0.5, reinit: true, reinit_seed: 1,
         train: {steps: 400, batch_size: 8}}
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
from pydantic import Field, model_validator

from ...core.errors import ModelpressError
from ...core.method import METHODS, MethodEntry, StageContext, StageKind
from ...distill.recover import (Losses, stage_folder, stage_signature, train_against_reference, train_metrics,
                                training_data, uses_teacher)
from ...distill.trainer import TrainConfig, TrainResult
from ...models.initialise import random_init_
from ...models.loading import LoadedModel
from ..apply import install_pruned
from ..config import PruneConfig
from ..layer import SparseLayer, dense_weight
from ..masks import global_masks, mask_from_scores
from ..patterns import Unstructured
from .gradual import budget_steps, finish_layers
from .magnitude import magnitude_layers


class LotteryConfig(PruneConfig):
    """Lottery-ticket rewinding (see the module docstring)."""

    method: Literal["lottery"] = "lottery"
    scope: Literal["layer", "global"] = Field("layer", description="one magnitude threshold per layer or overall")
    per_output: bool = Field(False, description="unstructured: compare within each output row instead of the layer")
    rewind_step: int = Field(0, ge=0, description="k: the step whose weights the ticket rewinds to")
    prune_at: float = Field(0.5, gt=0.0, lt=1.0, description="fraction of the steps trained before pruning")
    reinit: bool = Field(False, description="the control: survivors get a fresh random init, not their step-k values")
    reinit_seed: int = Field(0, ge=0, description="seed of the fresh init with reinit (not the model's own seed)")
    losses: Losses = "auto"
    train: TrainConfig = TrainConfig(steps=400, batch_size=8, lr=2e-4)

    @model_validator(mode="after")
    def _rewind_inside_the_run(self) -> "LotteryConfig":
        if self.scope == "global" and not isinstance(self.pattern, Unstructured):
            raise ValueError("global scope compares weights across layers: unstructured pattern only")
        if self.train.steps is not None:
            check_phases(self, self.train.steps)
        return self

    def phases(self, total: int) -> tuple[int, int]:
        """(steps before pruning, steps retraining the ticket)."""
        before = min(total - 1, max(1, round(self.prune_at * total)))
        return before, total - before


def check_phases(cfg: LotteryConfig, total: int) -> None:
    """A run needs a step on each side of pruning, and the rewind point inside the first part."""
    if total < 2:
        raise ValueError(f"lottery needs at least 2 training steps (train, then retrain the ticket), got {total}")
    before, _ = cfg.phases(total)
    if cfg.rewind_step > before:
        raise ValueError(f"rewind_step {cfg.rewind_step} is beyond the training run before pruning: "
                         f"{before} of {total} steps (prune_at {cfg.prune_at})")


class RewindPoint:
    """Training hook recording every floating parameter of ``model`` after step ``k`` (at once for
    ``k = 0``); the record rides in the checkpoint."""

    def __init__(self, model: nn.Module, k: int) -> None:
        self.model, self.k = model, k
        self.saved: dict[str, torch.Tensor] = {}
        if k == 0:
            self.record()

    @torch.no_grad()
    def record(self) -> None:
        self.saved = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.is_floating_point()}

    def on_gradients(self, step: int, model: nn.Module) -> None:
        pass

    def on_step(self, step: int, model: nn.Module, optimizer: Any) -> None:
        if step == self.k:
            self.record()

    def state_dict(self) -> dict[str, Any]:
        return {"saved": self.saved}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.saved = dict(state["saved"])


@torch.no_grad()
def magnitude_masks(layers: dict[str, nn.Module], cfg: LotteryConfig) -> dict[str, torch.Tensor]:
    """Keep-masks of the trained weights' magnitudes at the stage's sparsity (per layer or global)."""
    weights = {n: dense_weight(m, n)[0] for n, m in layers.items()}
    if cfg.scope == "global":
        return global_masks({n: w.abs() for n, w in weights.items()}, cfg.target_sparsity())
    s = None if cfg.pattern.fixed_sparsity() is not None else cfg.target_sparsity()
    return {n: mask_from_scores(w.abs(), cfg.pattern, s, layer=n, per_output=cfg.per_output) for n, w in weights.items()}


@torch.no_grad()
def rewind(lm: LoadedModel, cfg: LotteryConfig, saved: dict[str, torch.Tensor],
           masks: dict[str, torch.Tensor]) -> dict[str, SparseLayer]:
    """The ticket: every parameter back to its recorded value (with ``reinit``: a fresh seeded draw
    from the model's initialiser instead), the selected layers as SparseLayers holding that weight
    on ``masks`` and exactly zero elsewhere."""
    if cfg.reinit:
        random_init_(lm.module, cfg.reinit_seed)
    else:
        params = dict(lm.module.named_parameters())
        for n, v in saved.items():
            params[n].copy_(v)
    layers = dict(magnitude_layers(lm, cfg))
    return {n: install_pruned(lm.module, n, m, dense_weight(m, n)[0], masks[n], cfg.pattern, "bitmask")
            for n, m in layers.items()}


def run_lottery(lm: LoadedModel, cfg: LotteryConfig, ctx: StageContext) -> None:
    """Train, prune by magnitude, rewind the survivors to step k, retrain the ticket."""
    total = budget_steps(cfg.train, int(training_data(ctx, cfg.method).input_ids.shape[1]), cfg.method)
    try:
        check_phases(cfg, total)
    except ValueError as e:
        raise ModelpressError(f"{cfg.method}: {e}") from None
    before, after = cfg.phases(total)
    sig = stage_signature(cfg, ctx)
    base = stage_folder(ctx, cfg.method)
    ticket = _load_ticket(base, sig)
    first = None
    if ticket is None:
        magnitude_layers(lm, cfg)  # refuse a bad selection before training
        hook = RewindPoint(lm.module, cfg.rewind_step)
        first = train_against_reference(lm, ctx, cfg.losses, _steps(cfg.train, before), name=f"{cfg.method}-train",
                                        hooks=hook, signature={**sig, "phase": "train"}, folder=_sub(base, "train"))
        ticket = {"saved": hook.saved, "masks": magnitude_masks(dict(magnitude_layers(lm, cfg)), cfg)}
        _save_ticket(base, sig, ticket)
    layers = rewind(lm, cfg, ticket["saved"], ticket["masks"])
    second = train_against_reference(lm, ctx, cfg.losses, _steps(cfg.train, after), name=f"{cfg.method}-retrain",
                                     signature={**sig, "phase": "retrain"}, folder=_sub(base, "retrain"))
    train_metrics(cfg.method, _joined(first, second), ctx, rewind_step=cfg.rewind_step, prune_step=before,
                  reinit=cfg.reinit)
    start = f"re-initialised (seed {cfg.reinit_seed})" if cfg.reinit else f"rewound to step {cfg.rewind_step}"
    finish_layers(lm, cfg, layers, ctx, f"lottery {'control' if cfg.reinit else 'ticket'}: pruned after {before} "
                                        f"steps, {start}, retrained {after} steps")
    if base is not None:
        (base / "ticket.pt").unlink(missing_ok=True)


def _steps(train: TrainConfig, steps: int) -> TrainConfig:
    return train.model_copy(update={"steps": steps, "tokens": None, "minutes": None})


def _sub(base: Path | None, name: str) -> Path | None:
    if base is None:
        return None
    (base / name).mkdir(parents=True, exist_ok=True)
    return base / name


def _load_ticket(base: Path | None, sig: dict[str, Any]) -> dict[str, Any] | None:
    """The ticket a killed run wrote before retraining, if it belongs to this job."""
    path = base / "ticket.pt" if base is not None else None
    if path is None or not path.exists():
        return None
    data = torch.load(path, weights_only=True)
    return data if data.get("signature") == json.dumps(sig, sort_keys=True, default=str) else None


def _save_ticket(base: Path | None, sig: dict[str, Any], ticket: dict[str, Any]) -> None:
    if base is None:
        return
    base.mkdir(parents=True, exist_ok=True)
    tmp = base / "ticket.pt.tmp"
    torch.save({**ticket, "signature": json.dumps(sig, sort_keys=True, default=str)}, tmp)
    tmp.replace(base / "ticket.pt")


def _joined(a: TrainResult | None, b: TrainResult) -> TrainResult:
    """Both phases as one result (phase 2's steps counted after phase 1's)."""
    if a is None:
        return b
    return TrainResult(a.steps + b.steps, a.tokens + b.tokens, a.wall_s + b.wall_s, a.cpu_s + b.cpu_s,
                       a.losses + [(s + a.steps, v) for s, v in b.losses], a.evals + b.evals,
                       a.resumed_from, b.world_size)


METHODS.register("lottery")(MethodEntry(
    LotteryConfig, run_lottery, kind=StageKind.TRAINING, grad=True, needs_training_data=True,
    needs_reference=lambda cfg: cfg is None or uses_teacher(cfg.losses),
    summary="lottery-ticket rewinding: train, prune by magnitude, rewind survivors to step k, retrain"))
