"""E2E-QP (EfficientQAT's end-to-end stage) as a training stage: the step sizes alone, end to end.

After block-wise reconstruction each quantised layer's weights are fixed on their codes; what is left
to train is small: one step size per group. This stage swaps every quantised layer on an integer grid
for a :class:`~modelpress.quant.fake.LearnedGridLinear` with frozen codes (``(code - zero) * scale``,
gradient ``code - zero`` on the scale), freezes every other parameter, and trains the scales with
the distillation trainer against the float reference's logits (KD, forward KL at temperature
``temperature``). The layers are then packed back, exactly. Other formats' layers (NF4, FP8 ...) stay
as they are (their grid parameters are not step sizes). W8A8 layers (after ``block-ap`` with
``activations``) train the same way, their static activation step sizes too, and are packed back to
W8A8 layers, exactly.

Example recipe::

    stages:
      - {method: block-ap, format: {type: int, bits: 3, granularity: 64, symmetric: false}}
      - {method: e2e-qp, train: {steps: 100, batch_size: 4, lr: 1.0e-3}}
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn as nn
from pydantic import Field, model_validator

from ....core.errors import ModelpressError
from ....distill.losses import Batch, KDLoss, mixed_loss
from ....distill.teacher import model_outputs
from ....distill.trainer import TrainConfig, TrainData, Trainer
from ....core.layers import set_submodule
from ....core.method import METHODS, LayerRecord, MethodConfig, MethodEntry, StageContext, StageKind
from ....models.loading import LoadedModel
from ....models.selection import select_layers
from ...activation import ActQuantLinear, record_int8
from ...apply import record_quantized
from ...fake import FakeQuantLinear, LearnedGridLinear, learnable_grid, pack_after_training
from ...fake_act import fake_from_runtime
from ...qlinear import QuantLinear


class E2EQPConfig(MethodConfig):
    """Train the step sizes of the model's integer-grid quantised layers end to end (KD from the float model).

    Example:
        >>> E2EQPConfig().train.lr
        0.001
    """

    needs_float_weights: ClassVar[bool] = False  # it trains quantised layers

    method: Literal["e2e-qp"] = "e2e-qp"
    train: TrainConfig = TrainConfig(steps=100, batch_size=4, lr=1e-3)  # lr: a fraction of each step size per step
    temperature: float = Field(1.0, gt=0, description="KD temperature of the float model's logits")

    @model_validator(mode="after")
    def _budget(self) -> "E2EQPConfig":
        t = self.train
        if t.tokens is not None and t.tokens < t.batch_size:
            raise ValueError(f"train.tokens {t.tokens} is fewer than one batch of {t.batch_size} sequences: the "
                             "training budget is too small for one step")
        return self


def run_e2e_qp(lm: LoadedModel, cfg: E2EQPConfig, ctx: StageContext) -> None:
    """Swap in frozen-code layers, train their scales against the float logits, pack them back."""
    data = _data(ctx)
    seq = int(data.input_ids.shape[1])
    if cfg.train.tokens is not None and cfg.train.tokens < cfg.train.batch_size * seq:
        raise ModelpressError(f"e2e-qp: train.tokens {cfg.train.tokens} < one batch ({cfg.train.batch_size} x {seq} "
                              "tokens): the training budget is too small for one step")
    if len(data) < cfg.train.batch_size:
        raise ModelpressError(f"e2e-qp: the training text gives {len(data)} sequences, fewer than one batch of "
                              f"{cfg.train.batch_size} (train.batch_size); give more text or a smaller batch")
    if ctx.reference is None:
        raise ModelpressError("e2e-qp needs the float reference (its teacher)")
    trained, kept = _swap_in(lm, cfg)
    if not trained:
        _put_back(lm, kept)
        raise ModelpressError("e2e-qp trains the step sizes of quantised layers on an integer grid, and the selected "
                              "layers hold none: put it after a quantisation stage (block-ap, gptq, rtn ...)")
    flags = [(p, p.requires_grad) for p in lm.module.parameters()]
    lm.module.requires_grad_(False)
    for f in trained.values():
        f.scale.requires_grad_(True)
        if f.act is not None and f.act.scale is not None:  # a static activation step size
            f.act.scale.requires_grad_(True)
    teacher = ctx.reference.model()
    kd = mixed_loss([KDLoss(temperature=cfg.temperature, alpha=1.0)])

    def step(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        with torch.no_grad():
            t_out = model_outputs(teacher, batch, {})
        return kd(model_outputs(model, batch, {}), t_out, batch), int(batch.mask().sum())

    try:
        trainer = Trainer(lm.module, step, data, cfg.train, workdir=Path(ctx.workdir) if ctx.workdir else None,
                          signature={"stage": cfg.to_dict(), "source": ctx.source_id, "recipe": ctx.recipe},
                          progress=ctx.progress is not None, description="e2e-qp")
        result = trainer.train()
    finally:
        pack_after_training(lm.module)
        _put_back(lm, kept)
        for p, flag in flags:
            p.requires_grad_(flag)
        lm.module.eval()
    _record(lm, trained, ctx)
    ctx.metrics.append({"stage": "e2e-qp", "layers": len(trained), **result.to_dict()})
    ctx.warn(f"e2e-qp: {result.steps} steps, {result.tokens:,} tokens, {result.cpu_s:.0f} s CPU, "
             f"loss {result.losses[0][1]:.4f} -> {result.losses[-1][1]:.4f}" if result.losses else "e2e-qp: no step run")


def _data(ctx: StageContext) -> TrainData:
    data = ctx.train if ctx.train is not None else (TrainData(ctx.calib) if ctx.calib is not None else None)
    if data is None:
        raise ModelpressError("e2e-qp needs training text: pass --train FILE (or --calib FILE)")
    return data if isinstance(data, TrainData) else TrainData(data)


def _swap_in(lm: LoadedModel, cfg: E2EQPConfig) -> tuple[dict[str, LearnedGridLinear], dict[str, QuantLinear]]:
    """Every selected QuantLinear on an integer grid becomes a frozen-code layer with a trainable scale;
    every other QuantLinear a frozen fake-quantised layer (so the trainer's own swap finds none to
    train), its packed original kept to put back unchanged; every selected W8A8 layer a frozen-code
    layer with its input quantiser, whose static step size trains too. Returns (trained, kept)."""
    selected = {n for n, _ in select_layers(lm, cfg)}
    trained: dict[str, LearnedGridLinear] = {}
    kept: dict[str, QuantLinear] = {}
    for name, m in [(n, m) for n, m in lm.module.named_modules() if isinstance(m, QuantLinear)]:
        if name in selected and learnable_grid(m.fmt):
            f = LearnedGridLinear.from_quant(m, learn_zero=False)
            f.freeze_codes()
            trained[name] = f
        else:
            f, kept[name] = FakeQuantLinear.from_quant(m), m
            f.weight.requires_grad_(False)
        set_submodule(lm.module, name, f)
    for name in [n for n, m in lm.module.named_modules() if isinstance(m, ActQuantLinear) and n in selected]:
        f = fake_from_runtime(lm.module.get_submodule(name))
        f.freeze_codes()
        trained[name] = f
        set_submodule(lm.module, name, f)
    return trained, kept


def _put_back(lm: LoadedModel, kept: dict[str, QuantLinear]) -> None:
    for name, q in kept.items():
        set_submodule(lm.module, name, q)


def _record(lm: LoadedModel, swapped: dict[str, LearnedGridLinear], ctx: StageContext) -> None:
    """A report row per trained layer, its error against the float weight."""
    for name in swapped:
        q = lm.module.get_submodule(name)
        ref = ctx.reference.tensors(f"{name}.").get("weight")
        if ref is None or not isinstance(q, (QuantLinear, ActQuantLinear)):
            ctx.layers.append(LayerRecord(name, "e2e-qp", q.fmt.to_dict() if isinstance(q, QuantLinear) else None))
            continue
        w = ref.float() if tuple(ref.shape) == (q.out_features, q.in_features) else ref.float().t()  # HF Conv1D: (in, out)
        if isinstance(q, ActQuantLinear):
            record_int8(ctx, "e2e-qp", name, w, q)
        else:
            record_quantized(ctx, "e2e-qp", name, w, q.qtensor())


METHODS.register("e2e-qp")(MethodEntry(
    E2EQPConfig, run_e2e_qp, kind=StageKind.TRAINING, grad=True, needs_training_data=True, needs_reference=True,
    summary="EfficientQAT E2E-QP: train the quantised layers' step sizes end to end against the float model"))
