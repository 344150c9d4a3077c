"""LLM.int8() (Dettmers et al., 2022): vector-wise int8 matmul with mixed-precision decomposition.

For inputs X (n, in) and an int8 weight W_q (out, in) with one scale per row (``s_w = max|W_o|/127``)::

    O   = { j : |X_tj| > threshold for some token t }         outlier feature columns, per batch
    Y   = s_x * s_w * (X_q[:, ~O] @ W_q[:, ~O]^T)              int8, per-token absmax scales s_x
        + X[:, O] @ (s_w * W_q[:, O])^T                        float (x's dtype)

Outlier columns are few (a handful out of thousands in large models) but hold most of the
activation magnitude; keeping them out of the per-token scale keeps every other column precise.
As in bitsandbytes, only the int8 weight is stored: the outlier columns of W are dequantised from it.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ....core.config import Config
from ....core.layers import SAVED_LAYERS
from ....models.layers import linear_weight
from ...activation import Int8WeightModule, int8_matmul, per_token_qparams, quantize_act, quantize_weight_per_channel


def outlier_columns(X: torch.Tensor, threshold: float) -> torch.Tensor:
    """Bool mask (in,) of feature columns where some token has |x| > ``threshold``; X: (n, in)."""
    return (X.abs() > threshold).any(0)


def int8_vectorwise_matmul(X: torch.Tensor, W_q: torch.Tensor, s_w: torch.Tensor) -> torch.Tensor:
    """``X @ W^T`` with X quantised per token (absmax) and W_q per row: (n, in) x (out, in) -> (n, out)."""
    s_x, z_x = per_token_qparams(X.float(), symmetric=True)  # (n, 1)
    acc = int8_matmul(quantize_act(X, s_x, z_x, symmetric=True), W_q)  # (n, out) int32
    return acc.float() * s_x * s_w


def llm_int8_matmul(X: torch.Tensor, W_q: torch.Tensor, s_w: torch.Tensor, threshold: float) -> torch.Tensor:
    """Mixed-precision decomposition (module docstring): int8 part + float outlier part, float32 (n, out)."""
    O = outlier_columns(X, threshold)  # (in,)
    Y = int8_vectorwise_matmul(X.masked_fill(O, 0.0), W_q, s_w)  # (n, out)
    if O.any():
        W_O = W_q[:, O].to(X.dtype) * s_w.to(X.dtype).unsqueeze(1)  # (out, |O|) dequantised from int8
        Y = Y + (X[:, O] @ W_O.t()).float()
    return Y


class LLMInt8Spec(Config):
    """What an :class:`Int8OutlierLinear` does at run time (recorded in the manifest as its format).

    Example:
        >>> LLMInt8Spec().threshold
        6.0
    """

    type: Literal["llm_int8"] = "llm_int8"
    threshold: float = Field(6.0, gt=0, description="|x| above which a feature column is computed in float")


@SAVED_LAYERS.register("llm_int8_linear")
class Int8OutlierLinear(Int8WeightModule):
    """Linear computed by LLM.int8(): int8 weight (per-row scale) and run-time outlier decomposition.

    Example:
        >>> import torch.nn as nn
        >>> q = Int8OutlierLinear.from_linear(nn.Linear(64, 32), LLMInt8Spec(threshold=6.0))
        >>> q(torch.randn(2, 5, 64)).shape
        torch.Size([2, 5, 32])
    """

    is_compressed_linear = True
    transforms_activations = True  # non-outlier input columns are quantised to int8 (core.layers)
    layer_tag = "llm_int8_linear"
    spec_class = LLMInt8Spec

    @classmethod
    def from_linear(cls, module: torch.nn.Module, spec: LLMInt8Spec) -> "Int8OutlierLinear":
        """Quantise a Linear (or HF Conv1D) weight row-wise to int8; no float copy is kept."""
        qweight, scale = quantize_weight_per_channel(linear_weight(module))  # (out, in), (out,)
        return cls(spec, {"qweight": qweight, "weight_scale": scale, "bias": getattr(module, "bias", None)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        X = x.reshape(-1, self.in_features)  # (n, in)
        Y = llm_int8_matmul(X, self.qweight, self.weight_scale, self.spec.threshold)  # (n, out)
        if self.bias is not None:
            Y = Y + self.bias.float()
        return Y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


__all__ = ["Int8OutlierLinear", "LLMInt8Spec", "int8_vectorwise_matmul", "llm_int8_matmul", "outlier_columns"]
