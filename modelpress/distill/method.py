"""``distill``: train a student to imitate its teacher, as a recipe stage (a training stage).

The teacher is the model as the stage finds it (a ``layers`` or ``config`` student is built from
it), or the frozen float reference when the student is the compressed model itself (``self``:
distil the original into its pruned or quantised form). Training data are ``--train`` sequences
(or the calibration text); the loss is any mix of the registered losses. When the stage ends the
student replaces the model, which the saver then writes as usual.

Example recipe::

    stages:
      - method: distill
        student: {kind: layers, every: 2}
        losses: [{type: kd, temperature: 2.0, alpha: 0.5}]
        train: {steps: 300, batch_size: 8, lr: 1.0e-4}
"""
from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn as nn
from pydantic import Field

from ..core.errors import ModelpressError
from ..core.method import METHODS, MethodConfig, MethodEntry, StageContext, StageKind
from ..models.loading import LoadedModel
from .losses import Batch, CosineLoss, EmbeddingMSELoss, KDLoss, LossField, MixedLoss, mixed_loss, needs
from .students import StudentSpec, build_student
from .teacher import TopKCache, model_outputs
from .trainer import TrainConfig, TrainData, Trainer


class DistillConfig(MethodConfig):
    """Knowledge distillation into a student (see the module docstring)."""

    method: Literal["distill"] = "distill"
    student: StudentSpec = StudentSpec()
    #: "auto": soft targets with the hard-label mix for a language model, embedding MSE plus the
    #: cosine loss for an encoder (sentence embeddings)
    losses: list[LossField] | Literal["auto"] = "auto"
    train: TrainConfig = TrainConfig(steps=200, batch_size=8, lr=1e-4)
    teacher_top_k: int | None = Field(None, ge=1, description="cache the teacher's top-k logits once (no live teacher)")


class _StudentAndLoss(nn.Module):
    """What is trained: the student and the losses' own parameters (projections), in one forward so
    that a distributed wrapper sees every parameter used."""

    def __init__(self, student: nn.Module, loss: MixedLoss, want: dict[str, bool]) -> None:
        super().__init__()
        self.student, self.loss, self.want = student, loss, want

    def forward(self, batch: Batch, teacher_out: Any) -> torch.Tensor:
        return self.loss(model_outputs(self.student, batch, self.want), teacher_out, batch)


def run_distill(lm: LoadedModel, cfg: DistillConfig, ctx: StageContext) -> None:
    """Build the student, train it against the teacher, and make it the model."""
    data = _training_data(ctx)
    teacher = _teacher(lm, cfg, ctx)
    student = build_student(lm, cfg.student)
    if student is teacher:
        raise ModelpressError("distill: the student is the teacher itself (nothing to learn)")
    teacher.eval().requires_grad_(False)
    student.train().requires_grad_(True)
    losses = _losses(cfg, teacher)
    want = needs(losses)
    loss = mixed_loss(losses, _dims(student), _dims(teacher))
    module = _StudentAndLoss(student, loss, want)
    cache = None
    if cfg.teacher_top_k:
        sig = {"top_k": cfg.teacher_top_k, "data": data.input_ids.shape, "source": ctx.source_id}
        cache = TopKCache.build(teacher, data.input_ids, data.attention_mask, cfg.teacher_top_k,
                                _folder(ctx), sig | {"digest": _ids_digest(data.input_ids)})

    def step(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        with torch.no_grad():
            t_out = cache.outputs(batch.extra["index"]) if cache is not None else model_outputs(teacher, batch, want)
        return model(batch, t_out), int(batch.mask().sum())

    trainer = Trainer(module, step, data, cfg.train, workdir=_folder(ctx),
                      signature={"stage": cfg.to_dict(), "source": ctx.source_id}, progress=ctx.progress is not None,
                      description="distill")
    result = trainer.train()
    student = trainer.unwrapped().student.eval().requires_grad_(False)
    lm.module = student
    ctx.metrics.append({"stage": "distill", "student_params": sum(p.numel() for p in student.parameters()),
                        "teacher_params": sum(p.numel() for p in teacher.parameters()), **result.to_dict()})
    ctx.warn(f"distill: {result.steps} steps, {result.tokens:,} tokens, {result.cpu_s:.0f} s CPU, "
             f"loss {result.losses[0][1]:.4f} -> {result.losses[-1][1]:.4f}" if result.losses else "distill: no step run")


def _losses(cfg: DistillConfig, teacher: nn.Module) -> list:
    if cfg.losses != "auto":
        return list(cfg.losses)
    if is_language_model(teacher):
        return [KDLoss(temperature=2.0, alpha=0.5)]
    return [EmbeddingMSELoss(), CosineLoss()]


def is_language_model(model: nn.Module) -> bool:
    """A model with a language-modelling head (its outputs have logits), not a bare encoder."""
    name = type(model).__name__
    return name.endswith(("ForCausalLM", "LMHeadModel")) or (hasattr(model, "get_output_embeddings")
                                                               and model.get_output_embeddings() is not None)


def _training_data(ctx: StageContext) -> TrainData:
    data = ctx.train
    if data is None and ctx.calib is not None:
        data = TrainData(ctx.calib)
    if data is None:
        raise ModelpressError("distill needs training text: pass --train FILE (or --calib FILE)")
    return data if isinstance(data, TrainData) else TrainData(data)


def _teacher(lm: LoadedModel, cfg: DistillConfig, ctx: StageContext) -> nn.Module:
    if cfg.student.kind == "self":
        if ctx.reference is None:
            raise ModelpressError("distill into the compressed model needs the float reference")
        return ctx.reference.model()
    return lm.module


def _dims(model: nn.Module) -> dict[str, int]:
    cfg = getattr(model, "config", None)
    return {"hidden": int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0) or 0)}


def _folder(ctx: StageContext) -> Any:
    from pathlib import Path

    return Path(ctx.workdir) if ctx.workdir else None


def _ids_digest(ids: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


METHODS.register("distill")(MethodEntry(
    DistillConfig, run_distill, kind=StageKind.TRAINING, grad=True, needs_training_data=True,
    needs_reference=lambda cfg: cfg is not None and cfg.student.kind == "self",
    summary="knowledge distillation into a student (fewer layers, the compressed model, or a config)"))
