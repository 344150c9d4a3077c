"""``distill``: train a student to imitate its teacher, as a recipe stage (a training stage).

The teacher is the model as the stage finds it (a ``layers`` or ``config`` student is built from
it), or the frozen float reference when the student is the compressed model itself (``self``:
distil the original into its pruned or quantised form). Training data are ``--train`` sequences
(or the calibration text); the loss is any mix of the registered losses. When the stage ends the
student replaces the model, which the saver then writes as usual.

With ``generate`` the student trains on text the teacher wrote (see :mod:`.generate`): prompted by
the starts of the training text's documents (or the given prompts), generated once and kept in the
run's folder under the job's signature, so a resumed run reuses it.

Everything a user can get wrong (another tokenizer, a layer map naming missing layers, too little
text for one batch) is refused before the teacher runs once.

Example recipe::

    stages:
      - method: distill
        student: {kind: layers, every: 2}
        losses: [{type: kd, temperature: 2.0, alpha: 0.5}]
        train: {steps: 300, batch_size: 8, lr: 1.0e-4}
        generate: {samples: 512, max_new_tokens: 128, temperature: 1.0, top_p: 0.95}
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import torch.nn as nn
from pydantic import BeforeValidator, Field, TypeAdapter, ValidationError, model_validator

from ..core.config import nested_error
from ..core.errors import ModelpressError
from ..core.method import METHODS, MethodConfig, MethodEntry, StageContext, StageKind
from ..models.loading import LoadedModel
from .data import sequences
from .generate import GenerateConfig, OnPolicyConfig, generate_dataset, on_policy_batch
from .losses import (Batch, CosineLoss, EmbeddingMSELoss, KDLoss, LossConfig, LossField, MappedLoss, MixedLoss,
                     mixed_loss, needs)
from .students import StudentSpec, build_student
from .teacher import TopKCache, model_outputs
from .trainer import TrainConfig, TrainData, Trainer

_LOSS_LIST = TypeAdapter(list[LossField])


def _auto_or_losses(v: Any) -> Any:
    """Validate a list of losses on its own, so that an error names ``losses[0].alpha`` and not
    every branch of ``list | "auto"``."""
    if isinstance(v, str) and v == "auto":
        return v
    if not isinstance(v, list):
        raise ValueError("expected 'auto' or a list of losses")
    try:
        return _LOSS_LIST.validate_python(v)
    except ValidationError as e:
        raise nested_error(e) from None


#: a stage's losses: "auto" or a list of registered loss configs (validated one by one)
Losses = Annotated[list[LossField] | Literal["auto"], BeforeValidator(_auto_or_losses)]


class DistillConfig(MethodConfig):
    """Knowledge distillation into a student (see the module docstring)."""

    method: Literal["distill"] = "distill"
    student: StudentSpec = StudentSpec()
    #: "auto": soft targets with the hard-label mix for a language model, embedding MSE plus the
    #: cosine loss for an encoder (sentence embeddings)
    losses: Losses = "auto"
    train: TrainConfig = TrainConfig(steps=200, batch_size=8, lr=1e-4)
    teacher_top_k: int | None = Field(None, ge=1, description="cache the teacher's top-k logits once (no live teacher)")
    #: train on text the teacher generates (prompts: the training text's document starts unless given)
    generate: GenerateConfig | None = None
    #: GKD: a share of the batches are the student's own continuations, scored by the teacher
    on_policy: OnPolicyConfig | None = None

    @model_validator(mode="after")
    def _live_teacher_for_on_policy(self) -> "DistillConfig":
        if self.on_policy is not None and self.teacher_top_k is not None:
            raise ValueError("on_policy needs the live teacher on the student's samples: drop teacher_top_k")
        return self


class _StudentAndLoss(nn.Module):
    """What is trained: the student and the losses' own parameters (projections), in one forward so
    that a distributed wrapper sees every parameter used."""

    def __init__(self, student: nn.Module, loss: MixedLoss, want: dict[str, bool]) -> None:
        super().__init__()
        self.student, self.loss, self.want = student, loss, want

    def forward(self, batch: Batch, teacher_out: Any) -> torch.Tensor:
        return self.loss(model_outputs(self.student, batch, self.want), teacher_out, batch)


def run_distill(lm: LoadedModel, cfg: DistillConfig, ctx: StageContext) -> None:
    """Build the student, check it against the teacher, train it, and make it the model."""
    data = _training_data(ctx)
    teacher = _teacher(lm, cfg, ctx)
    student = build_student(lm, cfg.student)
    if student is teacher:
        raise ModelpressError("distill: the student is the teacher itself (nothing to learn)")
    losses = _losses(cfg, teacher)
    check_pair(teacher, student, losses)
    if cfg.on_policy is not None and not is_language_model(student):
        raise ModelpressError("distill on_policy: the student must generate text, and this one has no "
                              "language-model head")
    teacher.eval().requires_grad_(False)
    generated = None
    if cfg.generate is not None:
        data, generated = _generated_data(dataclasses.replace(lm, module=teacher), cfg, data, ctx)
    check_batch(data, cfg.train.batch_size, "generated text" if generated else "training text")
    student.train().requires_grad_(True)
    want = needs(losses)
    loss = mixed_loss(losses, _dims(student), _dims(teacher))
    module = _StudentAndLoss(student, loss, want)
    cache = None
    if cfg.teacher_top_k:
        sig = {"top_k": cfg.teacher_top_k, "data": data.input_ids.shape, **_signature(cfg, ctx)}
        cache = TopKCache.build(teacher, data.input_ids, data.attention_mask, cfg.teacher_top_k,
                                _folder(ctx), sig | {"digest": _ids_digest(data.input_ids)})

    teacher_used = any(c.reads_teacher for c in losses)  # hard labels alone: no teacher pass to pay

    def step(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        if cfg.on_policy is not None:
            batch = _maybe_on_policy(student, batch, cfg)
        with torch.no_grad():
            t_out = (cache.outputs(batch.extra["index"]) if cache is not None
                     else model_outputs(teacher, batch, want) if teacher_used else None)
        return model(batch, t_out), int(batch.mask().sum())

    trainer = Trainer(module, step, data, cfg.train, workdir=_folder(ctx),
                      signature=_signature(cfg, ctx), progress=ctx.progress is not None,
                      description="distill")
    result = trainer.train()
    student = trainer.unwrapped().student.eval().requires_grad_(False)
    lm.module = student
    ctx.metrics.append({"stage": "distill", "student_params": sum(p.numel() for p in student.parameters()),
                        "teacher_params": sum(p.numel() for p in teacher.parameters()), "generated": generated,
                        **result.to_dict()})
    ctx.warn(f"distill: {result.steps} steps, {result.tokens:,} tokens, {result.cpu_s:.0f} s CPU, "
             f"loss {result.losses[0][1]:.4f} -> {result.losses[-1][1]:.4f}" if result.losses else "distill: no step run")


def check_pair(teacher: nn.Module, student: nn.Module, losses: list[LossConfig]) -> None:
    """Refuse a student that cannot learn from this teacher: another vocabulary (tokenizer), or a
    loss whose layer map names a layer either model lacks."""
    vt, vs = _vocab(teacher), _vocab(student)
    if vt is not None and vs is not None and vt != vs:
        raise ModelpressError(f"distill: the student's vocabulary has {vs} tokens, the teacher's {vt}: a student must "
                              f"keep the teacher's tokenizer (no mapping between tokenizers is supported)")
    dt, ds = _depth(teacher), _depth(student)
    for c in losses:
        if isinstance(c, MappedLoss) and dt is not None and ds is not None:
            c.pairs(ds, dt)  # raises naming the missing layer


def _maybe_on_policy(student: nn.Module, batch: Batch, cfg: DistillConfig) -> Batch:
    """The batch, or (with probability ``on_policy.fraction``) the student's continuations of it;
    seeded by the batch's sample indices, so a resumed or repeated run draws the same."""
    key = json.dumps([cfg.train.seed, batch.extra["index"].tolist()]).encode()
    seed = int(hashlib.sha256(key).hexdigest()[:15], 16)
    if torch.rand((), generator=torch.Generator().manual_seed(seed)) >= cfg.on_policy.fraction:
        return batch
    return on_policy_batch(student, batch, cfg.on_policy, seed)


def check_batch(data: TrainData, batch_size: int, what: str = "training text") -> None:
    """Refuse training data with fewer sequences than one (global) batch, with both numbers."""
    if len(data) < batch_size:
        raise ModelpressError(f"distill: the {what} gives {len(data)} sequences, fewer than one batch of "
                              f"{batch_size} (train.batch_size); give more text or a smaller batch")


def _vocab(model: nn.Module) -> int | None:
    get = getattr(model, "get_input_embeddings", None)
    weight = getattr(get(), "weight", None) if callable(get) else None
    return int(weight.shape[0]) if weight is not None else None


def _depth(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    return int(n) if n else None


def _generated_data(teacher: LoadedModel, cfg: DistillConfig, data: TrainData,
                    ctx: StageContext) -> tuple[TrainData, dict[str, int]]:
    """Training sequences the teacher wrote (one per kept sample, cut at the training length) and
    the counts of what was dropped; generated once per signature in the run's folder."""
    gen = cfg.generate
    if gen.prompts is None and gen.from_docs is None:
        if data.source is None:
            raise ModelpressError("distill generate: the training data has no text source to take prompts from; "
                                  "set generate.prompts or generate.from_docs")
        gen = gen.model_copy(update={"from_docs": data.source})
    key = {"generate": gen.to_dict(), "prompts": _describe(gen.prompts or gen.from_docs),
           "data": _ids_digest(data.input_ids), **_signature(cfg, ctx)}
    name = f"generated-{hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]}.jsonl"
    folder = _folder(ctx)
    with tempfile.TemporaryDirectory() if folder is None else contextlib.nullcontext(folder) as where:
        path = Path(where) / name
        if not path.exists():  # (several processes may each write it: the same text, renamed into place)
            generate_dataset(teacher, gen, path, overwrite=True)
        from ..core.outputs import export_sidecar
        from ..data.sources import read_documents

        counts = json.loads(export_sidecar(path).read_text())["counts"]
        return sequences(teacher, read_documents(path), int(data.input_ids.shape[1])), counts


def _describe(spec: str) -> Any:
    from ..data.sources import describe_source

    return describe_source(spec).get("sha256")


def _signature(cfg: DistillConfig, ctx: StageContext) -> dict[str, Any]:
    """What a checkpoint or cache of this stage depends on: its config, the model, the whole recipe."""
    return {"stage": cfg.to_dict(), "source": ctx.source_id, "recipe": ctx.recipe}


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


def _folder(ctx: StageContext) -> Path | None:
    return Path(ctx.workdir) if ctx.workdir else None


def _ids_digest(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


METHODS.register("distill")(MethodEntry(
    DistillConfig, run_distill, kind=StageKind.TRAINING, grad=True, needs_training_data=True,
    needs_reference=lambda cfg: cfg is not None and cfg.student.kind == "self",
    summary="knowledge distillation into a student (fewer layers, the compressed model, or a config)"))
