"""Masks of exactly a pattern from a score matrix, and a mask a training schedule can tighten.

A *mask* is a bool tensor shaped like the weight, ``True`` where the weight is kept. Scores are
"higher = more important" (``|W|`` for magnitude, ``|W| * ||X||`` for Wanda, movement scores
accumulated from gradients ...). Every function here works on the (out, cols) view of a weight
(a Conv2d weight (out, in, kh, kw) is viewed as (out, in * kh * kw)).

Comparison groups:

* ``Unstructured``: per output row by default (each row keeps exactly ``cols - round(s * cols)``
  weights, Wanda's choice), or over the whole layer (``per_output=False``: exactly
  ``round(s * numel)`` zeros, classic magnitude pruning).
* ``NM(n, m)``: every run of ``m`` consecutive weights along the input dimension keeps its ``n``
  best.
* ``Block(r, c)``: tiles ranked by their summed score; exactly ``round(s * n_tiles)`` tiles zeroed.

Example:
    >>> from modelpress.sparsity.patterns import NM
    >>> m = mask_from_scores(torch.tensor([[4., 1., 3., 2.]]), NM(2, 4))
    >>> m.tolist()
    [[True, False, True, False]]
"""
from __future__ import annotations

import torch

from ..core.errors import ModelpressError
from ..quant.packing import pack_codes, unpack_codes
from .patterns import NM, Block, SparsityPattern, Structured, Unstructured, check_sparsity


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """The (out, cols) view of a weight-shaped tensor (a Conv2d weight flattens its last dims)."""
    return t.reshape(t.shape[0], -1)


def resolve_sparsity(pattern: SparsityPattern, sparsity: float | None, layer: str) -> float:
    """The fraction of zeros ``pattern`` gives: N:M fixes it; otherwise ``sparsity`` (checked)."""
    fixed = pattern.fixed_sparsity()
    if fixed is not None:
        if sparsity is not None and abs(sparsity - fixed) > 1e-9:
            raise ModelpressError(f"{layer}: pattern {pattern.n}:{pattern.m} implies sparsity {fixed:g}, "  # type: ignore[attr-defined]
                                  f"but sparsity {sparsity} was asked for")
        return fixed
    if sparsity is None:
        raise ModelpressError(f"{layer}: a {pattern.type} pattern needs a sparsity in [0, 1)")
    check_sparsity(sparsity, layer)
    return float(sparsity)


def mask_from_scores(scores: torch.Tensor, pattern: SparsityPattern, sparsity: float | None = None, *,
                     layer: str = "weight", per_output: bool = True) -> torch.Tensor:
    """Keep-mask of exactly ``pattern`` at ``sparsity``, keeping the highest ``scores``.

    Args:
        scores: weight-shaped scores, higher = keep (ties broken by position, deterministically).
        pattern: ``Unstructured``, ``NM`` or ``Block``.
        sparsity: fraction of zeros in [0, 1); implied (and may be omitted) for N:M.
        layer: name used in error messages.
        per_output: unstructured only: compare within each output row (True) or the whole layer.

    Returns:
        bool tensor shaped like ``scores``, True where the weight is kept.
    """
    if not torch.isfinite(scores).all():
        raise ModelpressError(f"{layer}: pruning scores contain NaN/Inf")
    pattern.check_shape(tuple(scores.shape), layer)
    s = resolve_sparsity(pattern, sparsity, layer) if not isinstance(pattern, Structured) else 0.0
    S = as_matrix(scores).float()  # (out, cols)
    if isinstance(pattern, Unstructured):
        keep = _rowwise_keep(S, s) if per_output else _flat_keep(S.reshape(1, -1), s).reshape(S.shape)
    elif isinstance(pattern, NM):
        keep = _nm_keep(S, pattern.n, pattern.m)
    elif isinstance(pattern, Block):
        keep = _block_keep(S, pattern.rows, pattern.cols, s)
    else:
        raise ModelpressError(f"{layer}: a {pattern.type} pattern removes whole units and has no elementwise mask; "
                              "use a structured pruning method")
    return keep.reshape(scores.shape)


def _prune_lowest(S: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask of each row of ``S`` (rows, n) with its ``k`` lowest entries pruned, ties by position.

    Same result as a stable sort, in O(n) per row: the k-th smallest value ``t`` splits the row;
    everything below ``t`` goes, and of the entries equal to ``t`` the first ones make up the count.
    """
    if k <= 0:
        return torch.ones_like(S, dtype=torch.bool)
    if k >= S.shape[1]:
        return torch.zeros_like(S, dtype=torch.bool)
    t = S.kthvalue(k, dim=1, keepdim=True).values  # (rows, 1)
    below, eq = S < t, S == t
    need = k - below.sum(1, keepdim=True)  # (rows, 1): ties to prune, >= 1
    return ~(below | (eq & (eq.cumsum(1) <= need)))


def _rowwise_keep(S: torch.Tensor, s: float) -> torch.Tensor:
    return _prune_lowest(S, round(s * S.shape[1]))


def _flat_keep(S: torch.Tensor, s: float) -> torch.Tensor:
    return _prune_lowest(S, round(s * S.shape[1]))


def _nm_keep(S: torch.Tensor, n: int, m: int) -> torch.Tensor:
    out, cols = S.shape
    G = S.reshape(out, cols // m, m).reshape(-1, m)  # (out * groups, m)
    return _prune_lowest(G, m - n).reshape(out, cols)


def _block_keep(S: torch.Tensor, r: int, c: int, s: float) -> torch.Tensor:
    out, cols = S.shape
    tiles = S.reshape(out // r, r, cols // c, c).sum(dim=(1, 3))  # (out/r, cols/c)
    keep_t = _flat_keep(tiles.reshape(1, -1), s).reshape(tiles.shape)
    return keep_t.repeat_interleave(r, 0).repeat_interleave(c, 1)


def global_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Unstructured keep-masks over *all* layers at once: exactly ``round(s * total)`` zeros overall.

    Scores are compared across layers, so they must be on one scale (e.g. ``|W|``). Memory: one
    flat copy of all scores (float32).
    """
    check_sparsity(sparsity, "global")
    flat = torch.cat([v.detach().reshape(-1).float() for v in scores.values()])  # (total,)
    k = round(sparsity * flat.numel())
    if k == 0:
        return {n: torch.ones_like(v, dtype=torch.bool) for n, v in scores.items()}
    t = torch.kthvalue(flat, k).values  # k-th smallest score
    below = int((flat < t).sum())
    ties_to_prune = k - below  # among entries equal to t, prune the first ones (deterministic)
    del flat
    out = {}
    for n, v in scores.items():
        v = v.detach().float()
        keep = v > t  # below t: pruned; equal to t: the first ``ties_to_prune`` of them pruned
        eq = (v == t).reshape(-1).nonzero().squeeze(1)
        n_prune = min(ties_to_prune, eq.numel())
        keep.view(-1)[eq[n_prune:]] = True
        ties_to_prune -= n_prune
        out[n] = keep
    return out


# ---- schedule-friendly mask -----------------------------------------------------------------
def cubic_sparsity(step: int, *, final: float, initial: float = 0.0, start: int = 0, end: int) -> float:
    """Zhu & Gupta (2017) cubic schedule: ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t1 - t0))**3``.

    Example:
        >>> round(cubic_sparsity(50, final=0.8, end=100), 3)
        0.7
    """
    if end <= start:
        raise ModelpressError(f"cubic schedule needs end > start, got start={start}, end={end}")
    frac = min(max((step - start) / (end - start), 0.0), 1.0)
    return final + (initial - final) * (1.0 - frac) ** 3


class PruningMask:
    """A mask that a training loop tightens step by step, with scores it can accumulate.

    ``accumulate(scores)`` adds to a running score (e.g. movement pruning's ``-W * grad`` each
    step); ``update(scores=None, sparsity)`` recomputes the mask from the given or accumulated
    scores. With ``monotone`` (the default) a pruned weight never comes back: its score is forced
    to ``-inf`` so a tighter mask is always a subset of the previous one.

    Example:
        >>> pm = PruningMask((4, 8), Unstructured())
        >>> w = torch.randn(4, 8)
        >>> pm.update(w.abs(), 0.25).sum().item(), pm.update(w.abs(), 0.5).sum().item()
        (24, 16)
    """

    def __init__(self, shape: tuple[int, ...], pattern: SparsityPattern, *, layer: str = "weight",
                 per_output: bool = True, monotone: bool = True) -> None:
        self.pattern, self.layer, self.per_output, self.monotone = pattern, layer, per_output, monotone
        self.mask = torch.ones(shape, dtype=torch.bool)
        self.scores: torch.Tensor | None = None  # accumulated scores, same shape
        self.sparsity = 0.0

    def accumulate(self, scores: torch.Tensor) -> None:
        """Add ``scores`` (weight-shaped) to the running total."""
        s = scores.detach().float()
        self.scores = s.clone() if self.scores is None else self.scores.add_(s)

    def update(self, scores: torch.Tensor | None = None, sparsity: float | None = None) -> torch.Tensor:
        """Recompute and return the mask at ``sparsity`` from ``scores`` (default: the accumulated ones)."""
        scores = self.scores if scores is None else scores.detach().float()
        if scores is None:
            raise ModelpressError(f"{self.layer}: no scores given or accumulated")
        if self.monotone:
            scores = torch.where(self.mask.to(scores.device), scores, torch.full_like(scores, -torch.inf))
            scores = scores.nan_to_num(neginf=torch.finfo(torch.float32).min)
        self.mask = mask_from_scores(scores, self.pattern, sparsity, layer=self.layer, per_output=self.per_output)
        self.sparsity = 1.0 - float(self.mask.float().mean())
        return self.mask


# ---- bitmask storage ------------------------------------------------------------------------
def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """uint8 (out, ceil(cols / 8)) bitmask of a keep-mask, little-endian bits per row."""
    return pack_codes(as_matrix(mask).to(torch.uint8).cpu(), 1).to(mask.device)


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_mask` back to a bool mask of ``shape``."""
    cols = 1
    for d in shape[1:]:
        cols *= d
    return unpack_codes(packed.cpu(), 1, cols).to(torch.bool).reshape(shape).to(packed.device)
