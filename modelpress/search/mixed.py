"""Calibrated allocation stages: ``mixed-precision`` (bits per layer) and ``mixed-sparsity``.

At compress time the stage measures every targeted layer's sensitivity on the user's calibration
data (:mod:`.sensitivity`), solves the budgeted allocation exactly (:mod:`.allocate`), and runs the
allocated recipe's stages (GPTQ at each layer's bits, SparseGPT or Wanda at each layer's sparsity)
in one pass of the engine, so the model gets exactly what ``modelpress allocate`` would write as a
recipe for the same table. The table, the allocation and the proxy's rank correlation go in the
report (the stage's metrics).

Example YAML::

    stages:
      - method: mixed-precision
        bits: [2, 3, 4]
        same_bytes_as_bits: 3          # the bytes of uniform 3-bit groups of 64
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ..core.errors import ModelpressError
from ..core.method import METHODS, MethodConfig, MethodEntry, StageContext
from ..models.layers import linear_shape
from ..models.loading import LoadedModel
from .allocate import Budget, ByteBudget, BitsBudget, SparsityBudget, allocate, allocation_recipe, summary
from .choices import Choice, QuantChoice, SparsityChoice
from .sensitivity import SensitivityTable, measure_sensitivity


class AllocatedConfig(MethodConfig):
    """Sensitivity measurement fields shared by the allocation stages: the KL is measured on the first
    tokens of the first calibration windows, each layer compressed with the whole set's Hessian."""

    sensitivity_samples: int = Field(1, ge=1, description="calibration windows the sensitivity is measured on")
    sensitivity_seq_len: int = Field(64, ge=2, description="tokens of each window used (each choice of each "
                                                           "layer runs the rest of the model on them)")

    def choices(self) -> list[Choice]:
        raise NotImplementedError

    def budget(self, lm: LoadedModel, table: SensitivityTable) -> Budget:
        raise NotImplementedError


class MixedPrecisionConfig(AllocatedConfig):
    """GPTQ with per-layer bits (symmetric int, groups of ``group``) allocated from measured sensitivity.

    The budget is ``same_bytes_as_bits`` (the bytes uniform quantisation at that width would store,
    scales included) or ``bits_per_weight`` (stored bits per weight on average, scales included).

    Example:
        >>> MixedPrecisionConfig(bits=[2, 3, 4], same_bytes_as_bits=3).group
        64
    """

    method: Literal["mixed-precision"] = "mixed-precision"
    bits: list[int] = Field([2, 3, 4], description="the widths a layer may get")
    group: int = Field(64, ge=1)
    algorithm: Literal["gptq", "rtn"] = "gptq"
    same_bytes_as_bits: int | None = Field(None, ge=2, le=8)
    bits_per_weight: float | None = Field(None, gt=0)

    @field_validator("bits")
    @classmethod
    def _widths(cls, v: list[int]) -> list[int]:
        if not v or any(not 2 <= b <= 8 for b in v) or len(set(v)) != len(v):
            raise ValueError(f"bits must be distinct widths in 2..8, got {v}")
        return sorted(v)

    @model_validator(mode="after")
    def _one_budget(self) -> "MixedPrecisionConfig":
        if (self.same_bytes_as_bits is None) == (self.bits_per_weight is None):
            raise ValueError("give exactly one budget: same_bytes_as_bits or bits_per_weight")
        return self

    def choices(self) -> list[Choice]:
        return [QuantChoice(b, self.group, self.algorithm) for b in self.bits]

    def budget(self, lm: LoadedModel, table: SensitivityTable) -> Budget:
        if self.bits_per_weight is not None:
            return BitsBudget(self.bits_per_weight)
        ref = QuantChoice(self.same_bytes_as_bits, self.group)
        return ByteBudget(sum(ref.nbytes(linear_shape(lm.module.get_submodule(n))) for n in table.layers))


class MixedSparsityConfig(AllocatedConfig):
    """Unstructured pruning with per-layer sparsity (from ``choices``) averaging ``sparsity``.

    Example:
        >>> MixedSparsityConfig(sparsity=0.6).choices()[0].label
        's50'
    """

    method: Literal["mixed-sparsity"] = "mixed-sparsity"
    sparsity: float = Field(0.6, gt=0, lt=1, description="average fraction of zeros over the targeted weights")
    levels: list[float] = Field([0.5, 0.6, 0.7], description="the sparsities a layer may get")
    algorithm: Literal["sparsegpt", "wanda"] = "sparsegpt"

    @field_validator("levels")
    @classmethod
    def _levels(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 <= s < 1 for s in v) or len(set(v)) != len(v):
            raise ValueError(f"levels must be distinct sparsities in [0, 1), got {v}")
        return sorted(v)

    def choices(self) -> list[Choice]:
        return [SparsityChoice(s, self.algorithm) for s in self.levels]

    def budget(self, lm: LoadedModel, table: SensitivityTable) -> Budget:
        return SparsityBudget(self.sparsity)


def run_allocated(lm: LoadedModel, cfg: AllocatedConfig, ctx: StageContext) -> None:
    """Measure, allocate, then run the allocated stages in one pass of the engine."""
    if ctx.calib is None or ctx.run_blocks is None:
        raise ModelpressError(f"{cfg.method} needs calibration data (--calib FILE) and the runner's block pass")
    ids = ctx.calib[: cfg.sensitivity_samples, : cfg.sensitivity_seq_len]
    table = measure_sensitivity(lm, ids, cfg.choices(), stats_ids=ctx.calib, targets=cfg.targets, ignore=cfg.ignore,
                                iterate=ctx.iterate)
    alloc = allocate(table, cfg.budget(lm, table))
    recipe = allocation_recipe(table, alloc, f"{cfg.method}-allocated")
    stages = [METHODS.get(s["method"]).config.model_validate(s) for s in recipe["stages"]]
    ctx.run_blocks([METHODS.get(st.method).block_stage(lm, st) for st in stages], checkpoints=False)
    ctx.metrics.append(allocation_metrics(table, alloc, recipe))


def allocation_metrics(table: SensitivityTable, alloc: Any, recipe: dict[str, Any]) -> dict[str, Any]:
    """What the report keeps of an allocation: the choice per layer, cost, prediction, the table."""
    return {"allocation": {n: table.choices[k].label for n, k in zip(table.layers, alloc.choice)},
            "summary": summary(table, alloc), "cost": alloc.cost, "limit": alloc.limit,
            "predicted_kl": alloc.objective, "recipe": recipe, "sensitivity": table.to_dict()}


_WHY = "allocated exactly (MILP) from sensitivity measured on the calibration data"
METHODS.register("mixed-precision")(MethodEntry(MixedPrecisionConfig, run_allocated, needs_calibration=True,
                                                summary=f"GPTQ with per-layer bits {_WHY}"))
METHODS.register("mixed-sparsity")(MethodEntry(MixedSparsityConfig, run_allocated, needs_calibration=True,
                                               summary=f"SparseGPT / Wanda with per-layer sparsity {_WHY}"))
