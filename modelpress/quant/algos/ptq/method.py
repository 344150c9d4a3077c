"""INT8 PTQ as recipe stages: ``int8-dynamic`` (data-free) and ``int8-static`` (observer-calibrated).

``int8-static`` calibrates the whole model at once with forward hooks (no sequential engine), so it
works on any ``nn.Module``: token ids in ``ctx.calib`` are fed as ``input_ids=``, a float tensor
(images, features) is fed positionally in batches of ``batch_size``.
"""
from __future__ import annotations

from typing import Literal

import torch.nn as nn
from pydantic import Field

from ....calib.capture import capture_inputs
from ....core.errors import ModelpressError
from ....core.selectors import select
from ....models.archspec import role_of
from ....models.layers import linear_weight
from ....models.loading import LoadedModel
from ....core.method import METHODS, MethodConfig, MethodEntry, RunContext
from ....models.selection import check_finite
from ...activation import ActQuantSpec, install_int8, record_int8
from ...observers import OBSERVERS, Observer, PercentileObserver
from .ptq import calibration_batches, dynamic_spec, feed, quantizable_layers, to_int8


class Int8DynamicConfig(MethodConfig):
    """W8A8 with int8 per-channel weights and activations quantised at run time (data-free).

    Example:
        >>> Int8DynamicConfig().method
        'int8-dynamic'
    """

    method: Literal["int8-dynamic"] = "int8-dynamic"


class Int8StaticConfig(MethodConfig):
    """W8A8 with int8 per-channel weights and one calibrated activation scale per layer.

    Example:
        >>> Int8StaticConfig(observer="histogram").symmetric
        False
    """

    method: Literal["int8-static"] = "int8-static"
    observer: Literal["minmax", "moving_average", "percentile", "mse", "histogram"] = "minmax"
    percentile: float = Field(99.99, gt=0, le=100, description="used by the percentile observer")
    symmetric: bool = Field(False, description="activation zero point fixed at 0 (else a calibrated int8 zero)")
    batch_size: int = Field(8, gt=0, description="calibration samples per forward pass")


def _layers(lm: LoadedModel, cfg: MethodConfig) -> list[tuple[str, nn.Module]]:
    """Selected float Linear / Conv1D / Conv2d layers (``targets`` minus ``ignore``)."""
    role_fn = lambda n: role_of(n, lm.module, lm.spec)  # noqa: E731
    layers = select(quantizable_layers(lm.module), cfg.targets, cfg.ignore, role_fn)
    if not layers:
        raise ModelpressError(f"stage {cfg.method!r}: targets {cfg.targets} minus ignore {cfg.ignore} leave no layer")
    return layers


def _install(lm: LoadedModel, ctx: RunContext, method: str, name: str, module: nn.Module, new: nn.Module) -> None:
    """Swap in ``new`` and report it against the float weight it replaces."""
    w = (module.weight if isinstance(module, nn.Conv2d) else linear_weight(module)).detach().float()
    check_finite(name, w)  # (out, in) or (out, in/groups, kh, kw)
    record_int8(ctx, method, name, w, install_int8(lm.module, name, new))


def run_int8_dynamic(lm: LoadedModel, cfg: Int8DynamicConfig, ctx: RunContext) -> None:
    """Replace every selected layer by its dynamic W8A8 version."""
    for name, module in ctx.iterate(_layers(lm, cfg), "int8-dynamic"):
        _install(lm, ctx, "int8-dynamic", name, module, to_int8(module, dynamic_spec(module)))


def _observer(cfg: Int8StaticConfig) -> Observer:
    if cfg.observer == "percentile":
        return PercentileObserver(percentile=cfg.percentile)
    return OBSERVERS.get(cfg.observer)()


def observe(lm: LoadedModel, layers: dict[str, nn.Module], cfg: Int8StaticConfig, ctx: RunContext) -> dict[str, Observer]:
    """Run the calibration data through the whole model, feeding each layer's input to its observer."""
    obs = {n: _observer(cfg) for n in layers}
    with capture_inputs(layers, lambda n, x: obs[n].update(x)):
        for batch in ctx.iterate(list(calibration_batches(ctx.calib, cfg.batch_size)), "int8-static calibration"):
            feed(lm.module, batch)
    return obs


def run_int8_static(lm: LoadedModel, cfg: Int8StaticConfig, ctx: RunContext) -> None:
    """Calibrate activation qparams with ``cfg.observer``, then replace every selected layer."""
    if ctx.calib is None:
        raise ModelpressError("int8-static needs calibration data (token ids or a batch of model inputs)")
    layers = dict(_layers(lm, cfg))
    obs = observe(lm, layers, cfg, ctx)
    spec = ActQuantSpec(mode="static", granularity="per_tensor", symmetric=cfg.symmetric)
    for name, module in layers.items():
        try:
            scale, zero = obs[name].qparams(8, cfg.symmetric)
        except ValueError:  # the calibration forward never reached this layer
            ctx.warn(f"{name}: received no calibration data; activations quantised dynamically instead")
            _install(lm, ctx, "int8-dynamic(fallback)", name, module, to_int8(module, dynamic_spec(module)))
            continue
        _install(lm, ctx, "int8-static", name, module, to_int8(module, spec, scale, zero))


METHODS.register("int8-dynamic")(MethodEntry(
    Int8DynamicConfig, run_int8_dynamic,
    summary="INT8 W8A8: per-channel int8 weights, activations quantised at run time (data-free; Linear and Conv2d)"))
METHODS.register("int8-static")(MethodEntry(
    Int8StaticConfig, run_int8_static, needs_calibration=True,
    summary="INT8 W8A8: per-channel int8 weights, calibrated per-tensor activation scales (Linear and Conv2d)"))
