"""Wanda (Sun et al., 2023, arXiv:2306.11695): prune by ``|W_ij| * ||X_j||_2``, per output row.

The score of weight (i, j) is its magnitude times the L2 norm of input feature j over all
calibration tokens; weights compete only within their output row (the paper's "per-output"
comparison group), or within each run of M inputs for N:M. No weight update.
"""
from __future__ import annotations

import torch

from ...masks import mask_from_scores
from ...patterns import SparsityPattern


def wanda_scores(W: torch.Tensor, act_norm: torch.Tensor) -> torch.Tensor:
    """``|W| * ||X||`` of shape (out, in) for ``W`` (out, in) and ``act_norm`` (in,)."""
    return W.abs() * act_norm.to(W.dtype).reshape(1, -1)


def wanda_mask(W: torch.Tensor, act_norm: torch.Tensor, pattern: SparsityPattern, sparsity: float | None,
               layer: str = "weight") -> torch.Tensor:
    """Keep-mask (out, in) of ``pattern`` at ``sparsity`` from the Wanda scores, per output row.

    Example:
        >>> from modelpress.sparsity.patterns import Unstructured
        >>> W = torch.tensor([[1.0, 2.0], [3.0, 1.0]])
        >>> wanda_mask(W, torch.tensor([4.0, 1.0]), Unstructured(), 0.5).tolist()
        [[True, False], [True, False]]
    """
    return mask_from_scores(wanda_scores(W, act_norm), pattern, sparsity, layer=layer, per_output=True)
