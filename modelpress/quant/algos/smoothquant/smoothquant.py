"""SmoothQuant (Xiao et al., 2023): migrate activation outliers into the weights.

For a norm feeding linears ``Y = (X diag(s)^-1) (diag(s) W^T)``: dividing the norm's output channel j
by ``s_j`` and multiplying input column j of every following weight by ``s_j`` leaves the float
function unchanged, while flattening the activation channels that make per-token int8 hard::

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

``alpha`` (the migration strength) splits the quantisation difficulty between activations and
weights; 0.5 balances them. Tensors in, tensors out: the stage in ``method.py`` gathers ``max|X_j|``
and writes the results back into the model.
"""
from __future__ import annotations

from typing import Sequence

import torch


def smoothing_factors(act_max: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float = 0.5,
                      eps: float = 1e-5) -> torch.Tensor:
    """Per input channel factors ``s`` (in,) for activations ``max|X_j|`` (in,) and weights (out_i, in).

    ``max|W_j|`` is taken over the rows of every weight fed by the same activations, as in the
    reference code; both maxima and ``s`` are clamped at ``eps`` so dead channels stay finite.

    Example:
        >>> s = smoothing_factors(torch.tensor([16.0, 1.0]), [torch.ones(3, 2)], alpha=0.5)
        >>> s.tolist()
        [4.0, 1.0]
    """
    w_max = torch.cat([w.detach().abs().float() for w in weights], 0).amax(0).clamp_min(eps)  # (in,)
    a_max = act_max.float().clamp_min(eps)  # (in,)
    return (a_max.pow(alpha) / w_max.pow(1 - alpha)).clamp_min(eps)


def fold_smoothing(s: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor | None,
                   weights: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
    """The norm's ``gamma / s`` (and ``beta / s``) and every weight's columns times ``s``.

    Returns new tensors (float32); ``(X / s) @ (W * s)^T == X @ W^T`` exactly in real arithmetic.
    """
    gamma = norm_weight.float() / s  # (in,)
    beta = norm_bias.float() / s if norm_bias is not None else None
    return gamma, beta, [w.float() * s.unsqueeze(0) for w in weights]  # each (out_i, in)


__all__ = ["fold_smoothing", "smoothing_factors"]
