"""TEAL-style activation sparsity (Liu et al., 2024): zero the small entries of a linear's input.

A hidden state entering a linear layer is mostly small in magnitude; entries with ``|x| <= t`` are
set to zero, and a column ``W[:, j]`` whose input ``x_j`` is zero need not be read at all. The
threshold ``t`` of each input is the ``s``-quantile of ``|x|`` over calibration tokens, so a
fraction ``s`` of the entries is zeroed (on data like the calibration data).

The maths here is tensors in, tensors out; :mod:`.method` wires it into the sequential engine.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ...core.errors import ModelpressError
from ...core.layers import SAVED_LAYERS
from ...models.layers import is_conv1d, linear_shape


def magnitude_threshold(abs_x: torch.Tensor, sparsity: float) -> float:
    """The ``sparsity``-quantile of ``abs_x``: zeroing ``|x| <= t`` zeroes that fraction of entries.

    Exact order statistic (``kthvalue``), no interpolation and no element limit.

    Example:
        >>> magnitude_threshold(torch.arange(10.0), 0.4)
        3.0
    """
    if not 0.0 <= sparsity < 1.0:
        raise ModelpressError(f"activation sparsity must be in [0, 1), got {sparsity}")
    flat = abs_x.reshape(-1).float()
    k = int(round(sparsity * flat.numel()))
    if k == 0:
        return -1.0  # keep everything, exact zeros included (|x| > -1 always)
    return float(flat.kthvalue(k).values)


def threshold_mask(x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """Boolean mask of the entries kept: ``|x| > t``."""
    return x.abs() > t


def column_sparse_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed per token from the columns of ``weight`` its non-zeros need.

    This is what a sparse GEMV kernel does at decode time: for token ``x`` with non-zeros ``J``,
    ``y = W[:, J] @ x[J]``; the other columns are never read. One token at a time (reference speed).
    """
    X = x.reshape(-1, x.shape[-1])  # (n, in)
    Y = torch.empty(X.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)  # (n, out)
    for i in range(X.shape[0]):
        J = X[i].nonzero().squeeze(1)  # (nnz,)
        Y[i] = weight.index_select(1, J) @ X[i, J]  # (out, nnz) @ (nnz,)
    if bias is not None:
        Y = Y + bias
    return Y.reshape(*x.shape[:-1], weight.shape[0])


@SAVED_LAYERS.register("teal_linear")
class ThresholdLinear(nn.Module):
    """Wraps a linear layer (``inner``, plain or quantised): inputs with ``|x| <= threshold`` are zeroed.

    Counts, per forward, the input entries that are zero and the multiply-adds whose weight column
    need not be read (``zeros x out_features``), so skipped work is measured on real data.
    A single-token call (decode) goes through :func:`column_sparse_linear` when ``inner`` is an
    ``nn.Linear``; batches use the dense kernel on the thresholded input (same result).

    Example:
        >>> lin = ThresholdLinear(nn.Linear(8, 4), threshold=0.5)
        >>> lin(torch.randn(3, 8)).shape
        torch.Size([3, 4])
    """

    layer_tag = "teal_linear"
    transforms_activations = True  # small inputs are zeroed (core.layers)

    def __init__(self, inner: nn.Module, threshold: float | torch.Tensor) -> None:
        super().__init__()
        self.inner = inner
        self.out_features, self.in_features = linear_shape(inner)
        self.register_buffer("threshold", torch.as_tensor(threshold, dtype=torch.float32).reshape(()).clone())
        self.reset_counters()

    def reset_counters(self) -> None:
        """Zero the measured counts (``zeros``/``entries`` of the input, ``skipped_macs``/``dense_macs``)."""
        self.zeros, self.entries, self.skipped_macs, self.dense_macs = 0, 0, 0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        xs = x * threshold_mask(x, self.threshold.to(x.dtype))
        zeros = int((xs == 0).sum())
        self.zeros += zeros
        self.entries += xs.numel()
        self.skipped_macs += zeros * self.out_features
        self.dense_macs += xs.numel() * self.out_features
        if xs.numel() == self.in_features and isinstance(self.inner, nn.Linear):
            return column_sparse_linear(xs, self.inner.weight, self.inner.bias)
        return self.inner(xs)

    def manifest_entry(self) -> dict[str, Any]:
        entry = {"shape": [self.out_features, self.in_features], "bias": getattr(self.inner, "bias", None) is not None}
        return {**entry, "conv1d": True} if is_conv1d(self.inner) else entry

    @classmethod
    def from_saved(cls, info: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "ThresholdLinear":
        """Rebuild around an empty layer of the saved shape and layout (``nn.Linear``, or GPT-2's
        ``Conv1D`` whose weight is (in, out)); the saver then loads (or replaces) ``inner``."""
        out_f, in_f = info["shape"]
        if info.get("conv1d"):
            from transformers.pytorch_utils import Conv1D

            inner: nn.Module = Conv1D(out_f, in_f)
        else:
            inner = nn.Linear(in_f, out_f, bias=info["bias"])
        return cls(inner, tensors["threshold"])

    def extra_repr(self) -> str:
        return f"threshold={float(self.threshold):.4g}"

