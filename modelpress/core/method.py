"""What every compression stage shares: its config base, the record it reports, the context it
runs in, and the registry entry that says what kind of stage it is.

A method module registers itself explicitly::

    METHODS.register("rtn")(MethodEntry(RTNConfig, run_rtn))

and a recipe stage ``{method: rtn, ...}`` is validated into ``RTNConfig`` and run by the
:class:`~modelpress.pipeline.runner.Runner` according to the entry's :class:`StageKind`.
These types sit at the bottom of the package: algorithms import them, never the engine.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol

import torch
from pydantic import field_validator, model_validator

from .config import Config, Registry
from .selectors import check_selector

if TYPE_CHECKING:
    import torch.nn as nn

    from ..calib.blocks import BlockInputs
    from ..models.loading import LoadedModel


class MethodConfig(Config):
    """Fields shared by every stage: which layers it touches.

    ``targets`` / ``ignore`` take names, globs, ``re:`` regexes or ``role:<role>``.
    """

    #: False for stages that wrap a layer without reading its weight (activation sparsity), which
    #: therefore also take already-quantised layers.
    needs_float_weights: ClassVar[bool] = True
    #: Capabilities (attribute names of the weight format, e.g. ``exact_zero``) the stage's
    #: ``format`` must have: a format without them is refused when the recipe is loaded.
    format_needs: ClassVar[tuple[str, ...]] = ()

    method: str
    targets: list[str] = ["re:.*"]
    ignore: list[str] = ["lm_head"]

    @field_validator("targets", "ignore")
    @classmethod
    def _valid_selectors(cls, v: list[str]) -> list[str]:
        for sel in v:
            check_selector(sel)
        return v

    @model_validator(mode="after")
    def _format_has_what_the_method_needs(self) -> "MethodConfig":
        fmt = getattr(self, "format", None)
        for cap in self.format_needs if fmt is not None else ():
            if not getattr(fmt, cap, False):
                raise ValueError(f"method {self.method!r} cannot use format {fmt.to_dict()}: it needs a format with "
                                 f"{cap.replace('_', ' ')}")
        return self


@dataclass
class LayerRecord:
    """One row of the per-layer report."""

    name: str
    method: str
    fmt: dict[str, Any] | None = None
    shape: tuple[int, int] | None = None
    bits_per_weight: float | None = None
    rel_error: float | None = None  # ||W - Q||_F / ||W||_F
    out_rel_error: float | None = None  # output reconstruction error on calibration data
    notes: list[str] = field(default_factory=list)


class StageKind(str, enum.Enum):
    """How the runner drives a stage.

    - ``data_free``: one call over the whole model (RTN, magnitude pruning, structured without data);
    - ``blockwise``: one decoder block at a time on the calibration stream (GPTQ, AWQ, SparseGPT ...);
    - ``reconstruction``: block by block, seeing both the compressed model's inputs and the float
      reference block's outputs for the same tokens (BRECQ / OmniQuant / EfficientQAT style);
    - ``training``: one call over the whole model with gradients, training data and the float
      reference (distillation, QAT end to end, recovery).
    """

    DATA_FREE = "data_free"
    BLOCKWISE = "blockwise"
    RECONSTRUCTION = "reconstruction"
    TRAINING = "training"


@dataclass
class StageContext:
    """Everything a running stage may use, typed; the runner fills it.

    Attributes:
        calib: (n_samples, seq_len) calibration token ids, or None.
        train: training sequences (a ``distill.trainer.TrainData``: ids, mask), a separate source from
            calibration, or None.
        reference: the frozen float reference of the original model
            (:class:`~modelpress.pipeline.reference.FloatReference`), when the stage asked for it.
        float_inputs: in a reconstruction pass, the float stream's inputs into the current block.
        device, dtype: where and in which precision the stage computes.
        matmul_precision: float32 matmul precision of the calibration forwards, statistics products
            and training stages ("fp32", or "bf16": torch's "medium"); solvers keep fp32.
        grad: whether the stage runs with gradients (its entry declares it).
        rank, world_size: this process's place in a distributed run (0 and 1 otherwise).
        layers, warnings: the report the stage fills.
        workdir: the run's own folder, where a resumable stage may keep checkpoints.
        source_id: content digest of the model's source (part of checkpoint signatures).
        recipe: the whole recipe as a dict (part of checkpoint signatures: a stage's result depends
            on the stages before it, not only on its own config).
    """

    calib: torch.Tensor | None = None
    progress: Callable[..., Any] | None = None
    layers: list[LayerRecord] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    workdir: str | None = None
    source_id: str | None = None
    recipe: dict[str, Any] | None = None
    offload_activations: bool = False
    train: torch.Tensor | None = None
    reference: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    matmul_precision: str = "fp32"
    grad: bool = False
    rank: int = 0
    world_size: int = 1
    #: the runner's block pass, for a stage that drives its own (``run_blocks([stage], checkpoints=False)``)
    run_blocks: Callable[..., None] | None = None
    #: reconstruction stages: the float stream into the current block (a ``BlockInputs``, the float
    #: reference's inputs for the same tokens as the compressed stream), set by the runner per block
    float_inputs: Any = None
    #: what training stages measured (steps, tokens, CPU time, curves), one dict per stage, for the report
    metrics: list[dict[str, Any]] = field(default_factory=list)

    def warn(self, msg: str) -> None:
        if msg not in self.warnings:
            self.warnings.append(msg)

    def iterate(self, items: list, description: str):
        """Iterate with a progress bar when one is configured."""
        if self.progress is None:
            return iter(items)
        return self.progress(items, description)


#: The name algorithms used before the runner existed; the same class.
RunContext = StageContext


class BlockStage(Protocol):
    """A calibrated stage: compresses one block given its cached inputs.

    Optional: ``restore_block(lm, index, block)``, for a stage that changes more than a block's
    tensors (sizes its modules or the config cache); a resumed run calls it on each block rebuilt
    from its checkpoint.
    """

    def process_block(self, lm: "LoadedModel", index: int, block: "nn.Module", prefix: str,
                      inputs: "BlockInputs", ctx: StageContext) -> None: ...


class ReconstructionStage(Protocol):
    """A block-reconstruction stage: ``inputs`` is the compressed stream into the block, ``targets``
    the float reference block's outputs for the same tokens, (n_samples, seq, hidden)."""

    def process_block(self, lm: "LoadedModel", index: int, block: "nn.Module", prefix: str,
                      inputs: "BlockInputs", ctx: StageContext, targets: torch.Tensor) -> None: ...


@dataclass(frozen=True)
class MethodEntry:
    """A registered method: its config class, how the runner drives it, and the transform.

    ``run(lm, cfg, ctx)`` for data-free and training stages; ``block_stage(lm, cfg)`` builds the
    per-block stage of blockwise and reconstruction stages. ``kind`` defaults to blockwise when a
    block stage is given and to data-free otherwise.
    """

    config: type[MethodConfig]
    run: Callable[["LoadedModel", Any, StageContext], None] | None
    needs_calibration: bool = False
    block_stage: Callable[["LoadedModel", Any], Any] | None = None
    summary: str = ""
    kind: StageKind | None = None
    grad: bool = False  # runs with gradients (training stages)
    #: reads the float reference (reconstruction stages always do); a function of the stage's config
    #: when only some configurations need it
    needs_reference: bool | Callable[[Any], bool] = False
    needs_training_data: bool = False
    checkpoints: bool = True  # blockwise: per-block checkpoints are valid (no change of block shapes)

    def __post_init__(self) -> None:
        if self.kind is None:
            object.__setattr__(self, "kind", StageKind.BLOCKWISE if self.block_stage is not None else StageKind.DATA_FREE)
        if self.kind in (StageKind.BLOCKWISE, StageKind.RECONSTRUCTION) and self.block_stage is None:
            raise ValueError(f"a {self.kind.value} method needs a block_stage")
        if self.kind in (StageKind.DATA_FREE, StageKind.TRAINING) and self.run is None:
            raise ValueError(f"a {self.kind.value} method needs a run function")

    def uses_reference(self, cfg: Any = None) -> bool:
        """Whether a stage of this method with config ``cfg`` needs the float reference."""
        if self.kind == StageKind.RECONSTRUCTION:
            return True
        return bool(self.needs_reference(cfg) if callable(self.needs_reference) else self.needs_reference)


#: The method families' packages: a module anywhere below them that registers a method is found.
METHOD_PACKAGES = ("modelpress.quant.algos", "modelpress.sparsity", "modelpress.diagnostics", "modelpress.distill",
                   "modelpress.lowrank", "modelpress.search.mixed")
METHODS: Registry[MethodEntry] = Registry("method", packages=METHOD_PACKAGES)
