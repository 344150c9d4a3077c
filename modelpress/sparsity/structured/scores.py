"""Importance of structural units, and which units to remove: tensors in, indices out.

The calibrated score of a unit is the size of what removing it takes away from the block's
output on the calibration tokens. A unit feeds the block through some input columns ``J`` of an
output projection ``W`` (``o_proj`` for a head, ``down_proj`` for an MLP neuron), so its
contribution is ``X_J W_J^T`` and

    score^2 = ||X_J W_J^T||_F^2 = tr(W_J (X_J^T X_J) W_J^T)

which needs only the Gram matrix of the projection's input (a Hessian accumulator). For a single
column (a neuron) this is exactly ``||X_j||_2 * ||W_:,j||_2``: the activation-norm x weight-norm
product. ``magnitude`` replaces the Gram matrix by the identity (weights only); ``random`` is the
baseline the calibrated score must beat.

Layers are ranked by block influence (ShortGPT, Men et al. 2024): ``BI = 1 - mean_t cos(x_t, y_t)``
between a block's input and output hidden states; a block that barely changes its input goes first.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ...core.errors import ModelpressError

Score = Literal["activation", "magnitude", "random"]
GQAMode = Literal["query", "kv"]


def unit_scores(W: torch.Tensor, G: torch.Tensor | None, width: int) -> torch.Tensor:
    """Contribution norms of consecutive input groups of ``width`` columns.

    Args:
        W: (out, units * width) output projection.
        G: (units * width, units * width) Gram matrix of its input (None: identity).
    Returns:
        (units,) ``sqrt(tr(W_u G_uu W_u^T))`` for each unit ``u``.
    """
    out, cols = W.shape
    Wu = W.reshape(out, cols // width, width).transpose(0, 1)  # (units, out, width)
    if G is None:
        return Wu.pow(2).sum((1, 2)).sqrt()
    idx = torch.arange(cols).reshape(-1, width)  # (units, width)
    Guu = G[idx[:, :, None], idx[:, None, :]]  # (units, width, width)
    return torch.einsum("uow,uwv,uov->u", Wu, Guu, Wu).clamp_min(0).sqrt()


def neuron_scores(W_down: torch.Tensor, sq_sum: torch.Tensor | None) -> torch.Tensor:
    """(inter,) ``||X_j||_2 * ||W_down[:, j]||_2`` (weights only when ``sq_sum`` is None)."""
    w = W_down.pow(2).sum(0).sqrt()  # (inter,)
    return w if sq_sum is None else w * sq_sum.clamp_min(0).sqrt()


def random_scores(n: int, seed: int) -> torch.Tensor:
    """(n,) i.i.d. uniform scores from a seeded generator (the comparison baseline)."""
    return torch.rand(n, generator=torch.Generator().manual_seed(seed))


def count_to_remove(fraction: float, n: int, what: str) -> int:
    """``round(fraction * n)`` units, refusing to remove all of them."""
    if not 0.0 <= fraction < 1.0:
        raise ModelpressError(f"{what}: fraction must lie in [0, 1), got {fraction}")
    r = int(round(fraction * n))
    if r >= n:
        raise ModelpressError(f"{what}: a fraction of {fraction} of {n} would remove all of them")
    return r


def heads_to_remove(head_sc: torch.Tensor, group_sc: torch.Tensor, fraction: float, mode: GQAMode) -> list[int]:
    """Query heads to remove so that grouped-query attention stays valid.

    ``query``: the same number of lowest-scoring heads inside every K/V group (K/V heads kept);
    ``kv``: the lowest-scoring whole groups (a K/V head and all its query heads). With one query
    head per K/V head (plain multi-head attention) both are the same thing.
    """
    n, kv = head_sc.numel(), group_sc.numel()
    g = n // kv
    if mode == "kv" or g == 1:
        drop = torch.sort(torch.argsort(group_sc)[:count_to_remove(fraction, kv, "K/V head groups")]).values
        return (drop[:, None] * g + torch.arange(g)).reshape(-1).tolist()
    r = count_to_remove(fraction, g, f"query heads per K/V group (of {g})")
    per_group = head_sc.reshape(kv, g)  # (kv, g)
    drop = torch.argsort(per_group, dim=1)[:, :r] + torch.arange(kv)[:, None] * g
    return sorted(drop.reshape(-1).tolist())


def refit_columns(W: torch.Tensor, H: torch.Tensor, keep: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """Least-squares weights for the input columns left after pruning (one-shot compensation).

    Minimises ``||X W^T - X_S W_S'^T||_F`` over the calibration inputs ``X``, whose Gram matrix
    is ``H``; the normal equations give ``W_S' = W H[:, S] H[S, S]^-1``. The removed units' share
    of the output is re-expressed through the kept units they correlate with.

    Args:
        W: (out, in) the projection before pruning.
        H: (in, in) Gram matrix (any positive scale) of its input.
        keep: (k,) kept input columns.
        percdamp: fraction of mean diag(H[S, S]) added to its diagonal (as GPTQ) for stability.
    Returns:
        (out, k) new weights, in ``W``'s dtype.
    """
    Hd = H.double()
    H_SS = Hd[keep][:, keep]  # (k, k)
    H_SS += percdamp * H_SS.diagonal().mean().clamp_min(1e-12) * torch.eye(len(keep), dtype=torch.float64)
    rhs = W.double() @ Hd[:, keep]  # (out, k)
    return torch.linalg.solve(H_SS, rhs.T).T.to(W.dtype)  # H_SS is symmetric


def lowest(scores: torch.Tensor, r: int) -> list[int]:
    """Indices of the ``r`` smallest scores, sorted."""
    return sorted(torch.argsort(scores)[:r].tolist())


class BlockInfluence:
    """Running mean of ``cos(x_t, y_t)`` over tokens; ``value`` = 1 - mean (ShortGPT's BI).

    Example:
        >>> bi = BlockInfluence(); x = torch.randn(2, 5, 8)
        >>> bi.update(x, x); round(bi.value, 6)
        0.0
    """

    def __init__(self) -> None:
        self.total, self.n = 0.0, 0

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """``x``, ``y``: (..., hidden) the block's input and output hidden states."""
        cos = F.cosine_similarity(x.double(), y.double(), dim=-1)  # (...)
        self.total += float(cos.sum())
        self.n += cos.numel()

    @property
    def value(self) -> float:
        return 1.0 - self.total / max(self.n, 1)
