"""Block-AP as a recipe stage: a ``reconstruction`` stage, one decoder block at a time.

For each block the engine hands over the compressed stream's inputs and the float block's outputs
for the same tokens. Every selected linear of the block becomes a fake-quantised layer: a float
layer trains its own float weight through the round-to-nearest grid of the stage's ``format``
(EfficientQAT), a layer an earlier stage quantised (RTN, GPTQ, AWQ, HQQ) starts on its own grid and
format (its float weight is gone), a pruned layer keeps its mask.
Integer grids train their step sizes and zero points (LSQ / LSQ+) with the weights; other formats
train the weights through their fixed grid (straight-through). The block is then packed back
(exactly: the packed block computes what the trained fake-quantised block computed) and the engine
moves on, so memory stays that of one block; the engine's per-block checkpoints make it resumable.
The training itself is in :mod:`.block_ap`.

With ``activations`` set, every trained linear also fake-quantises its input
(:mod:`modelpress.quant.fake_act`): a static quantiser starts from its observer's range over the
block's calibration inputs and its step size (and zero point) trains with the grids (LSQ / LSQ+);
the block is packed to W8A8 layers (:class:`~modelpress.quant.activation.ActQuantLinear`), exactly.
Only combinations with a runtime layer are accepted (int 8-bit symmetric per-channel weights, 8-bit
activations), so the recipe is refused at load rather than after training.

Example recipe (from a GPTQ start)::

    stages:
      - {method: gptq, format: {type: int, bits: 3, granularity: 64, symmetric: false}}
      - {method: block-ap, samples: 64, epochs: 2}
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn as nn
from pydantic import Field, field_validator, model_validator

from ....calib.blocks import BlockInputs
from ....core.errors import ModelpressError
from ....core.layers import set_submodule
from ....core.method import METHODS, MethodConfig, MethodEntry, StageContext, StageKind
from ....core.threads import matmul_precision
from ....models.layers import linear_weight
from ....models.loading import LoadedModel
from ....models.selection import check_finite, select_layers
from ...activation import ActQuantLinear, record_int8
from ...apply import record_quantized
from ...fake import FakeQuantLinear, LearnedGridLinear, fake_quant_problem, learnable_grid
from ...fake_act import ActFakeQuant, ActFakeSpec, calibrate_static, w8a8_problem
from ...fields import FormatField
from ...formats import IntFormat
from ...granularity import PerGroup
from ...qlinear import QuantLinear
from .block_ap import reconstruct

GridMode = Literal["auto", "learned", "fixed"]


def check_trainable_format(fmt: Any) -> Any:
    """Refuse a format whose fake quantisation gives no usable gradient, naming it."""
    why = fake_quant_problem(fmt)
    if why is not None:
        raise ValueError(f"format {fmt.to_dict()} cannot be trained through: {why}")
    return fmt


class BlockAPConfig(MethodConfig):
    """EfficientQAT's block-wise training of weights and quantisation parameters.

    Fields:
        format: the grid of layers that are still float (quantised layers keep their own).
        samples: calibration sequences trained on (the first ones; at most as many as given).
        epochs, batch_size: passes over them, sequences per optimizer step.
        weight_lr, quant_lr: AdamW learning rates of the weights and of the grids (0: frozen); the step
            sizes train as multiples of their start, so ``quant_lr`` is a fraction per step at any width.
        weight_lr_max_step: a layer's weight learning rate is at most this fraction of its mean step
            size (None: no cap). Why: Adam moves every weight by about its lr per step whatever the
            grid, so the lr that trains a 3-bit grid flips the roundings of an 8-bit one (36x finer)
            that RTN already got right. At 2-4 bits on SmolLM2 the cap is far above ``weight_lr``.
        step_sizes: ``learned`` trains step sizes and zero points (integer grids only), ``fixed``
            keeps the grid, ``auto`` learns them where the format allows.
        learn_zero: LSQ+: train the zero points too (asymmetric grids).
        norm_lr: train the block's normalisation gains and biases (its 1-D parameters outside the
            linear layers) at this learning rate; None keeps them. Why: EfficientQAT's Block-AP trains
            every weight of the block, norms included; a norm's gain scales the input channels of the
            linears it feeds, a per-channel correction the grids cannot make.
        activations: fake-quantise each layer's input too (W8A8 QAT) and pack to W8A8 layers; the
            weight ``format`` must then be int 8-bit symmetric per channel.

    Example:
        >>> BlockAPConfig(format={"type": "int", "bits": 3, "granularity": 64, "symmetric": False}).epochs
        2
    """

    needs_float_weights: ClassVar[bool] = False  # a quantised layer starts from its own grid

    method: Literal["block-ap"] = "block-ap"
    format: FormatField = IntFormat(bits=4, granularity=PerGroup(size=64), symmetric=False)
    samples: int = Field(64, ge=1, description="calibration sequences trained on")
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(2, ge=1, description="sequences per optimizer step")
    weight_lr: float = Field(2e-5, ge=0)
    weight_lr_max_step: float | None = Field(0.01, gt=0)
    quant_lr: float = Field(5e-3, ge=0, description="relative: a step size moves by about this fraction per step")
    weight_decay: float = Field(0.0, ge=0)
    step_sizes: GridMode = "auto"
    learn_zero: bool = True
    norm_lr: float | None = Field(None, gt=0, description="train the block's norm gains / biases at this lr (None: kept)")
    activations: ActFakeSpec | None = None
    seed: int = Field(0, ge=0)

    @field_validator("format")
    @classmethod
    def _usable_format(cls, v: Any) -> Any:
        return check_trainable_format(v)

    @model_validator(mode="after")
    def _something_to_train(self) -> "BlockAPConfig":
        if self.samples < self.batch_size:
            raise ValueError(f"samples {self.samples} < batch_size {self.batch_size}: the training budget is "
                             "too small for one optimizer step")
        if self.step_sizes == "learned" and not learnable_grid(self.format):
            raise ValueError(f"step_sizes 'learned' needs an integer format with per-channel or per-group scales; "
                             f"format {self.format.to_dict()} has no learnable step size (use step_sizes: fixed)")
        if self.activations is not None and (why := w8a8_problem(self.format, self.activations)) is not None:
            raise ValueError(f"activations: {why}")
        grid_trains = self.quant_lr > 0 and self.step_sizes != "fixed" and learnable_grid(self.format)
        grid_trains |= self.quant_lr > 0 and self.activations is not None and self.activations.mode == "static"
        if self.weight_lr == 0 and not grid_trains and self.norm_lr is None:
            raise ValueError("nothing to train: weight_lr is 0, norm_lr is unset and the grid is fixed (step_sizes: fixed, quant_lr 0, or a "
                             f"format without learnable step sizes: {self.format.type})")
        return self


class BlockAPStage:
    """The per-block work of :class:`BlockAPConfig` (see the module docstring)."""

    def __init__(self, cfg: BlockAPConfig, selected: list[str]) -> None:
        self.cfg, self.selected = cfg, selected

    def process_block(self, lm: LoadedModel, index: int, block: nn.Module, prefix: str, inputs: BlockInputs,
                      ctx: StageContext, targets: torch.Tensor) -> None:
        names = [n for n in self.selected if n.startswith(prefix + ".")]
        fakes = {n: f for n in names if (f := self._trainable(lm, n, ctx)) is not None}
        if not fakes:
            return
        for n, f in fakes.items():
            set_submodule(lm.module, n, f)
        n_use = min(self.cfg.samples, inputs.hidden.shape[0])
        if n_use < self.cfg.batch_size:
            raise ModelpressError(f"block-ap: {n_use} calibration sequences, fewer than one batch of "
                                  f"{self.cfg.batch_size} (batch_size); give more --calib samples")
        if n_use < self.cfg.samples:
            ctx.warn(f"block-ap: samples {self.cfg.samples} asked, {n_use} calibration sequences given; trained on {n_use}")
        x, y = inputs.hidden[:n_use].clone(), targets[:n_use]
        calibrate_static(list(fakes.values()), lambda: _run_block(block, x, inputs.kwargs, self.cfg.batch_size))
        norms = norm_params(block) if self.cfg.norm_lr is not None else []
        groups = self._groups(fakes) + ([{"params": norms, "lr": self.cfg.norm_lr}] if norms else [])
        frozen = _freeze_all_but(block, [p for g in groups for p in g["params"]])
        try:
            with matmul_precision(ctx.matmul_precision):  # training's forwards and backwards, like the run's
                fit = reconstruct(block, groups, x, y, inputs.kwargs, epochs=self.cfg.epochs,
                                  batch_size=self.cfg.batch_size, weight_decay=self.cfg.weight_decay,
                                  seed=self.cfg.seed * 100_003 + index)
        finally:
            _restore_flags(frozen)
        self._pack(lm, index, prefix, fakes, ctx, fit)
        if norms:
            ctx.metrics[-1]["norm_params_trained"] = sum(p.numel() for p in norms)

    def _groups(self, fakes: dict[str, FakeQuantLinear]) -> list[dict[str, Any]]:
        """AdamW groups: the weights at ``weight_lr`` (a layer whose cap binds in a group of its own, at
        the cap), then the grids at ``quant_lr``."""
        weights, capped = [], []
        for f in fakes.values() if self.cfg.weight_lr > 0 else ():
            cap = self._lr_cap(f)
            if cap is not None and cap < self.cfg.weight_lr:
                capped.append({"params": [f.weight], "lr": cap})
            else:
                weights.append(f.weight)
        grids = [p for f in fakes.values() if isinstance(f, LearnedGridLinear) and self.cfg.quant_lr > 0
                 for p in (f.scale, f.zero) if p is not None and p.requires_grad]
        grids += [p for f in fakes.values() if f.act is not None and self.cfg.quant_lr > 0
                  for p in (f.act.scale, f.act.zero) if p is not None and p.requires_grad]
        return [{"params": weights, "lr": self.cfg.weight_lr}, {"params": grids, "lr": self.cfg.quant_lr}, *capped]

    def _lr_cap(self, f: FakeQuantLinear) -> float | None:
        """``weight_lr_max_step`` x the layer's mean step size at the start (None: no cap, or no step)."""
        if self.cfg.weight_lr_max_step is None:
            return None
        step = f.step_size() if isinstance(f, LearnedGridLinear) else f.params.get("scale")
        if step is None:
            return None
        return self.cfg.weight_lr_max_step * float(step.detach().abs().float().mean())

    def _trainable(self, lm: LoadedModel, name: str, ctx: StageContext) -> FakeQuantLinear | None:
        """The layer as a fake-quantised layer on its starting grid (None: a kind this stage leaves alone)."""
        m = lm.module.get_submodule(name)
        mask = None
        pruned = getattr(m, "layer_tag", None) == "sparse"
        if isinstance(m, QuantLinear):
            q = m
        elif pruned or not getattr(m, "is_compressed_linear", False):  # float: the RTN grid, the float weight
            if pruned and not self.cfg.format.exact_zero:
                raise ModelpressError(f"block-ap: {name} is pruned and format {self.cfg.format.type} has no exact "
                                      "zero, so its pruned weights would not stay 0; use an int format")
            w = (m.effective_weight() if pruned else linear_weight(m)).detach().float()  # (out, in)
            mask = m.mask if pruned else None
            check_finite(name, w)
            bias = getattr(m, "bias", None)
            q = QuantLinear.from_linear_weight(self.cfg.format.quantize(w), bias.detach() if bias is not None else None)
        else:
            ctx.warn(f"block-ap: {name} is a {type(m).__name__}, which it does not train; left as it is")
            return None
        learn = self.cfg.step_sizes != "fixed" and learnable_grid(q.fmt)
        f = LearnedGridLinear.from_quant(q, mask, self.cfg.learn_zero) if learn else FakeQuantLinear.from_quant(q)
        if not isinstance(m, QuantLinear):
            # a float layer trains its float weight through the RTN grid (EfficientQAT), not the grid
            # values: started on grid points, a weight must move half a step before any rounding changes
            with torch.no_grad():
                f.weight.copy_(w)
        if mask is not None and not learn:
            f.mask = mask.to(torch.bool)
        if f.bias is not None:
            f.bias.requires_grad_(False)
        if self.cfg.activations is not None:
            if (why := w8a8_problem(q.fmt, self.cfg.activations)) is not None:
                raise ModelpressError(f"block-ap: {name} (quantised by an earlier stage): {why}")
            f.act = ActFakeQuant(self.cfg.activations)
        return f

    def _pack(self, lm: LoadedModel, index: int, prefix: str, fakes: dict[str, FakeQuantLinear], ctx: StageContext,
              fit: Any) -> None:
        ref = ctx.reference.block(index) if ctx.reference is not None else None
        for n, f in fakes.items():
            q = f.to_quant()
            set_submodule(lm.module, n, q)
            w = linear_weight(ref.get_submodule(n[len(prefix) + 1:])).float() if ref is not None else f.weight.detach()
            rec = record_int8(ctx, "block-ap", n, w, q) if isinstance(q, ActQuantLinear) else \
                record_quantized(ctx, "block-ap", n, w, q.qtensor())
            rec.notes.append(f"block {index}: output MSE {fit.mse_before:.4g} -> {fit.mse_after:.4g} "
                             f"({fit.steps} steps, {fit.tokens} tokens)")
            if fit.reverted_from is not None:
                rec.notes.append(f"block {index}: training ended at output MSE {fit.reverted_from:.4g}, above its "
                                 "start; the starting weights and grid were kept")
        ctx.metrics.append({"stage": "block-ap", "block": index, "mse_before": fit.mse_before,
                            "mse_after": fit.mse_after, "steps": fit.steps, "tokens": fit.tokens,
                            "cpu_s": fit.cpu_s, "epoch_losses": fit.losses, "reverted_from": fit.reverted_from})


def norm_params(block: nn.Module) -> list[nn.Parameter]:
    """The block's 1-D parameters outside its layers that hold a matrix (float, quantised or
    fake-quantised, everything inside them included): normalisation gains and biases, found by shape,
    not by architecture."""
    inside: set[int] = set()
    for m in block.modules():
        if isinstance(m, (FakeQuantLinear, QuantLinear, ActQuantLinear)) or \
                any(p.dim() >= 2 for p in m.parameters(recurse=False)):
            inside.update(id(p) for p in m.parameters())
    return [p for p in block.parameters() if id(p) not in inside and p.dim() == 1 and p.is_floating_point()]


@torch.no_grad()
def _run_block(block: nn.Module, x: torch.Tensor, kwargs: dict[str, Any], batch_size: int) -> None:
    """Feed ``x`` (n, seq, hidden) through ``block`` in batches (for calibration hooks)."""
    for s in range(0, x.shape[0], batch_size):
        block(x[s:s + batch_size], **kwargs)


def _freeze_all_but(block: nn.Module, params: list[nn.Parameter]) -> list[tuple[nn.Parameter, bool]]:
    """Turn off gradients of every block parameter not in ``params``; the previous flags, to restore."""
    keep = {id(p) for p in params}
    flags = [(p, p.requires_grad) for p in block.parameters()]
    for p, _ in flags:
        p.requires_grad_(id(p) in keep)
    return flags


def _restore_flags(flags: list[tuple[nn.Parameter, bool]]) -> None:
    for p, flag in flags:
        p.requires_grad_(flag)


def block_ap_stage(lm: LoadedModel, cfg: BlockAPConfig) -> BlockAPStage:
    return BlockAPStage(cfg, [n for n, _ in select_layers(lm, cfg)])


METHODS.register("block-ap")(MethodEntry(
    BlockAPConfig, None, needs_calibration=True, block_stage=block_ap_stage, kind=StageKind.RECONSTRUCTION,
    summary="EfficientQAT Block-AP: train each block's weights and step sizes against the float block"))
