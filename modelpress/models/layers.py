"""Generic discovery of weight layers, so layer-wise methods work on unknown architectures."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..core.layers import set_submodule  # noqa: F401  (re-exported: where model code looks for it)


def is_conv1d(module: nn.Module) -> bool:
    """HF ``Conv1D`` (GPT-2): a linear whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear, HF Conv1D, or an already-compressed linear exposing ``in_features``."""
    if isinstance(module, nn.Linear) or is_conv1d(module):
        return True
    return getattr(module, "is_compressed_linear", False)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in) whatever the storage layout (a view, not a copy, for nn.Linear)."""
    if is_conv1d(module):
        return module.weight.t()
    return module.weight


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features)."""
    if is_conv1d(module):
        return int(module.nf), int(module.weight.shape[0])
    return int(module.out_features), int(module.in_features)


def named_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All linear-like modules, in registration order."""
    return [(n, m) for n, m in model.named_modules() if n and is_linear_like(m)]


