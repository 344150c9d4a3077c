"""``recover``: distil the float model into the compressed one, keeping what compression decided.

After pruning or quantisation the model is trained end to end with the frozen float reference as
teacher (the original model, streamed one block at a time): pruned layers keep their masks (a
:class:`~modelpress.sparsity.layer.SparseLayer` computes with ``weight * mask``), quantised layers
train through their fake-quantised form on their own grid and are packed back exactly, and
structurally pruned layers keep their smaller shapes. It can follow any stage; placed where nothing
was compressed yet, it says so and does nothing.

:func:`train_against_reference` is the loop shared with the pruning-during-training methods
(gradual magnitude, movement, lottery-ticket rewinding): the model as it stands is the student, the
float reference the teacher, and the stage's :class:`~modelpress.distill.trainer.TrainHooks` change
masks while it trains.

Example recipe::

    stages:
      - {method: magnitude, sparsity: 0.9}
      - {method: recover, train: {steps: 300, batch_size: 8, lr: 5.0e-4}}
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn as nn

from ..core.errors import ModelpressError
from ..core.method import METHODS, MethodConfig, MethodEntry, StageContext, StageKind
from ..models.loading import LoadedModel
from .losses import Batch, CosineLoss, EmbeddingMSELoss, KDLoss, mixed_loss, needs
from .method import Losses, check_pair, is_language_model
from .teacher import model_outputs
from .trainer import TrainConfig, TrainData, Trainer, TrainHooks, TrainResult



class RecoverConfig(MethodConfig):
    """Recovery fine-tuning of the compressed model against the float reference."""

    method: Literal["recover"] = "recover"
    losses: Losses = "auto"
    train: TrainConfig = TrainConfig(steps=200, batch_size=8, lr=1e-4)


class _StudentAndLoss(nn.Module):
    """The model and the losses' own parameters in one forward (a distributed wrapper sees all)."""

    def __init__(self, student: nn.Module, loss: nn.Module, want: dict[str, bool],
                 regulariser: Callable[[], torch.Tensor] | None) -> None:
        super().__init__()
        self.student, self.loss, self.want, self.regulariser = student, loss, want, regulariser

    def forward(self, batch: Batch, teacher_out: Any) -> torch.Tensor:
        loss = self.loss(model_outputs(self.student, batch, self.want), teacher_out, batch)
        return loss if self.regulariser is None else loss + self.regulariser()


def uses_teacher(losses: Any) -> bool:
    """Whether the losses read the teacher (hard labels or a task loss alone do not: no float
    reference needed)."""
    return losses == "auto" or any(c.reads_teacher for c in losses)


def train_against_reference(lm: LoadedModel, ctx: StageContext, losses: Any, train: TrainConfig, *,
                            name: str, signature: dict[str, Any], hooks: TrainHooks | None = None,
                            regulariser: Callable[[], torch.Tensor] | None = None,
                            folder: Path | None = None) -> TrainResult:
    """Train ``lm.module`` in place on the stage's losses, the float reference as teacher.

    Args:
        losses: ``"auto"`` or a list of loss configs (see :mod:`.losses`).
        train: budget, batch and optimiser.
        name: the stage's name in progress bars and errors.
        signature: what a checkpoint of this training depends on (the stage, the recipe, the source).
        hooks: per-step callbacks (pruning schedules); their state rides in the checkpoint.
        regulariser: a term added to every step's loss (movement pruning's sparsity penalty).
        folder: where the checkpoint lives (default: a subfolder of the run's folder per stage).
    Returns:
        the trainer's :class:`TrainResult` (steps, tokens, CPU seconds, curves).
    """
    data = training_data(ctx, name)
    if len(data) < train.batch_size:
        raise ModelpressError(f"{name}: the training text gives {len(data)} sequences, fewer than one batch of "
                              f"{train.batch_size} (train.batch_size); give more text or a smaller batch")
    check_budget(train, int(data.input_ids.shape[1]), name)
    student = lm.module
    teacher = None
    if uses_teacher(losses):
        if ctx.reference is None:
            raise ModelpressError(f"{name} needs the float reference as teacher")
        teacher = ctx.reference.model()
    configs = _resolve(losses, student)
    if teacher is not None:
        check_pair(teacher, student, configs)
    want = needs(configs)
    module = _StudentAndLoss(student, mixed_loss(configs, _dims(student), _dims(teacher or student)), want, regulariser)
    student.train()
    for p in student.parameters():
        p.requires_grad_(p.is_floating_point())

    def step(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        with torch.no_grad():
            t_out = model_outputs(teacher, batch, want) if teacher is not None else None
        return model(batch, t_out), int(batch.mask().sum())

    where = folder if folder is not None else stage_folder(ctx, name)
    trainer = Trainer(module, step, data, train, workdir=where, signature=signature, hooks=hooks,
                      progress=ctx.progress is not None, description=name)
    result = trainer.train()
    lm.module = trainer.unwrapped().student.eval().requires_grad_(False)
    return result


def check_budget(train: TrainConfig, seq_len: int, name: str) -> None:
    """Refuse a token budget smaller than one optimizer step (it would silently become one step)."""
    if train.steps is None and train.tokens is not None and train.tokens < train.batch_size * seq_len:
        raise ModelpressError(f"{name}: train.tokens {train.tokens} is less than one step "
                              f"(batch_size {train.batch_size} x {seq_len} tokens)")


def training_data(ctx: StageContext, name: str) -> TrainData:
    """``--train`` sequences, else the calibration ids; refused when there are none."""
    data = ctx.train
    if data is None and ctx.calib is not None:
        data = TrainData(ctx.calib)
    if data is None:
        raise ModelpressError(f"{name} needs training text: pass --train FILE (or --calib FILE)")
    return data if isinstance(data, TrainData) else TrainData(data)


def stage_folder(ctx: StageContext, name: str) -> Path | None:
    """This training stage's own checkpoint folder in the run's folder (one per training stage, so
    a later stage never finds, and clears, an earlier one's checkpoint)."""
    return Path(ctx.workdir) / f"train-{len(ctx.metrics)}-{name}" if ctx.workdir else None


def stage_signature(cfg: MethodConfig, ctx: StageContext) -> dict[str, Any]:
    """What a checkpoint of stage ``cfg`` depends on: its config, the model, the whole recipe and
    the stages run before it."""
    return {"stage": cfg.to_dict(), "source": ctx.source_id, "recipe": ctx.recipe, "index": len(ctx.metrics)}


def train_metrics(name: str, result: TrainResult, ctx: StageContext, **extra: Any) -> None:
    """The stage's row of training metrics and its one-line summary in the report's warnings."""
    ctx.metrics.append({"stage": name, **extra, **result.to_dict()})
    first, last = (result.losses[0][1], result.losses[-1][1]) if result.losses else (float("nan"),) * 2
    ctx.warn(f"{name}: {result.steps} steps, {result.tokens:,} tokens, {result.cpu_s:.0f} s CPU, "
             f"loss {first:.4f} -> {last:.4f}")


def _resolve(losses: Any, student: nn.Module) -> list:
    if losses != "auto":
        return list(losses)
    if is_language_model(student):
        return [KDLoss(temperature=2.0, alpha=0.5)]
    return [EmbeddingMSELoss(), CosineLoss()]


def _dims(model: nn.Module) -> dict[str, int]:
    cfg = getattr(model, "config", None)
    return {"hidden": int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0) or 0)}


def compressed_before(lm: LoadedModel, ctx: StageContext) -> bool:
    """Whether an earlier stage compressed something: a layer it reported, a compressed layer in the
    model (pruned, quantised), or a training stage that changed the model."""
    if ctx.layers or ctx.metrics:
        return True
    return any(getattr(m, "layer_tag", None) == "sparse" or getattr(m, "is_compressed_linear", False)
               for m in lm.module.modules())


def run_recover(lm: LoadedModel, cfg: RecoverConfig, ctx: StageContext) -> None:
    """Distil the float reference into the compressed model (nothing when nothing was compressed)."""
    if not compressed_before(lm, ctx):
        ctx.warn("recover: no compression stage ran before it, so there is nothing to recover: it did nothing "
                 "(place it after a pruning or quantisation stage)")
        return
    result = train_against_reference(lm, ctx, cfg.losses, cfg.train, name="recover",
                                     signature=stage_signature(cfg, ctx))
    train_metrics("recover", result, ctx)


METHODS.register("recover")(MethodEntry(
    RecoverConfig, run_recover, kind=StageKind.TRAINING, grad=True, needs_training_data=True,
    needs_reference=lambda cfg: cfg is None or uses_teacher(cfg.losses),
    summary="recovery: distil the float model into the compressed one (masks, grids, shapes kept)"))
