"""Plain INT8 post-training quantisation of Linear and Conv2d layers, for any model.

* dynamic: weights int8 per output channel; activations quantised at run time, per token for
  linears (one scale per row of the flattened input) and per tensor for convolutions.
* static:  weights as above; one calibrated per-tensor activation scale (and zero point) per layer,
  chosen by an activation observer (:mod:`modelpress.quant.observers`) on calibration batches.

This module says what happens to one layer and how calibration data is fed to a model; the stage
in ``method.py`` wires it to hooks and the recipe.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn as nn

from ....models.layers import is_conv1d
from ...activation import ActQuantConv2d, ActQuantLinear, ActQuantSpec, Int8WeightModule


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Float ``nn.Linear``, HF ``Conv1D`` and ``nn.Conv2d`` layers, in registration order."""
    return [(n, m) for n, m in model.named_modules()
            if n and (isinstance(m, (nn.Linear, nn.Conv2d)) or is_conv1d(m))]


def dynamic_spec(module: nn.Module) -> ActQuantSpec:
    """Per-token dynamic activations for linears; per-tensor for convolutions (their rows are pixels)."""
    return ActQuantSpec(mode="dynamic", granularity="per_tensor" if isinstance(module, nn.Conv2d) else "per_token")


def to_int8(module: nn.Module, spec: ActQuantSpec, act_scale: torch.Tensor | None = None,
            act_zero: torch.Tensor | None = None) -> Int8WeightModule:
    """The W8A8 replacement of a Linear / Conv1D / Conv2d under ``spec``."""
    if isinstance(module, nn.Conv2d):
        return ActQuantConv2d.from_conv(module, spec, act_scale, act_zero)
    return ActQuantLinear.from_linear(module, spec, act_scale, act_zero)


def calibration_batches(calib: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive slices of the first dimension (samples) of ``calib``."""
    for s in range(0, calib.shape[0], batch_size):
        yield calib[s:s + batch_size]


def feed(model: nn.Module, batch: torch.Tensor) -> None:
    """Run ``model`` on one calibration batch: token ids as ``input_ids=``, anything else positionally.

    The batch goes to the model's device; the model itself is never moved.
    """
    p = next(model.parameters(), None)
    batch = batch.to(p.device) if p is not None else batch
    if batch.dtype in (torch.int32, torch.int64):
        model(input_ids=batch)
    else:
        model(batch.to(p.dtype) if p is not None and p.is_floating_point() else batch)


__all__ = ["calibration_batches", "dynamic_spec", "feed", "quantizable_layers", "to_int8"]
