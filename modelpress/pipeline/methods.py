"""The method registry: one entry per compression method, a typed config plus a transform.

A method module registers itself explicitly::

    METHODS.register("rtn")(MethodEntry(RTNConfig, run_rtn))

and a recipe stage ``{method: rtn, ...}`` is validated into ``RTNConfig`` and run by ``run_rtn``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from pydantic import field_validator

from ..core.config import Config, Registry
from ..core.errors import ModelpressError
from ..core.selectors import check_selector, select
from ..models.archspec import role_of
from ..models.layers import linear_weight, named_linears
from ..models.loading import LoadedModel


class MethodConfig(Config):
    """Fields shared by every stage: which layers it touches.

    ``targets`` / ``ignore`` take names, globs, ``re:`` regexes or ``role:<role>``.
    """

    #: False for stages that wrap a layer without reading its weight (activation sparsity), which
    #: therefore also take already-quantised layers.
    needs_float_weights: ClassVar[bool] = True

    method: str
    targets: list[str] = ["re:.*"]
    ignore: list[str] = ["lm_head"]

    @field_validator("targets", "ignore")
    @classmethod
    def _valid_selectors(cls, v: list[str]) -> list[str]:
        for sel in v:
            check_selector(sel)
        return v


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


@dataclass
class RunContext:
    """What a running stage may use: calibration tokens, progress bars, the report it fills."""

    calib: torch.Tensor | None = None  # (n_samples, seq_len) token ids
    progress: Callable[..., Any] | None = None
    layers: list[LayerRecord] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    workdir: str | None = None  # the run's own folder, where a resumable stage may keep checkpoints
    source_id: str | None = None  # content digest of the model's source (part of checkpoint signatures)
    offload_activations: bool = False  # keep the calibration activation cache in a memory-mapped file

    def warn(self, msg: str) -> None:
        if msg not in self.warnings:
            self.warnings.append(msg)

    def iterate(self, items: list, description: str):
        """Iterate with a progress bar when one is configured."""
        if self.progress is None:
            return iter(items)
        return self.progress(items, description)


@dataclass(frozen=True)
class MethodEntry:
    """A registered method: its config class and the transform that applies it."""

    config: type[MethodConfig]
    run: Callable[[LoadedModel, Any, RunContext], None] | None  # whole-model transform
    needs_calibration: bool = False
    #: for calibrated methods: builds the per-block stage run by the sequential engine
    block_stage: Callable[[LoadedModel, Any], Any] | None = None
    summary: str = ""


METHODS: Registry[MethodEntry] = Registry("method")


def select_layers(lm: LoadedModel, cfg: MethodConfig) -> list[tuple[str, torch.nn.Module]]:
    """The linear-like layers of ``lm`` chosen by ``cfg.targets`` minus ``cfg.ignore``."""
    role_fn = lambda n: role_of(n, lm.module, lm.spec)  # noqa: E731
    layers = select(named_linears(lm.module), cfg.targets, cfg.ignore, role_fn)
    if not layers:
        raise ModelpressError(f"stage {cfg.method!r}: targets {cfg.targets} minus ignore {cfg.ignore} leave no layer")
    done = [n for n, m in layers if cfg.needs_float_weights and not isinstance(getattr(m, "weight", None), torch.Tensor)]
    if done:  # packed codes: the float weight is gone, and re-quantising codes compounds their rounding
        kind = type(dict(layers)[done[0]]).__name__
        raise ModelpressError(f"stage {cfg.method!r}: {len(done)} selected layer(s) are already compressed ({done[0]}: "
                              f"{kind}); compress the original model instead, or add them to the stage's ignore list")
    return layers


def check_finite(name: str, w: torch.Tensor) -> None:
    """A NaN/Inf weight would poison every scale: refuse it and name the tensor."""
    if not torch.isfinite(w).all():
        bad = int((~torch.isfinite(w)).sum())
        raise ModelpressError(f"weight {name}.weight has {bad} NaN/Inf values; refusing to compress it")


def layer_weight(name: str, module: torch.nn.Module) -> torch.Tensor:
    """(out, in) float32 copy of a layer's weight, checked finite (a copy: callers may write to the layer)."""
    w = linear_weight(module).detach().to(torch.float32, copy=True)
    check_finite(name, w)
    return w
