"""Pareto fronts: the points no other point beats on every objective (all minimised).

Pure functions on plain tuples, shared by the search (its front over quality, size and latency)
and the report (quality against size).

Example:
    >>> nondominated([(1.0, 3.0), (2.0, 2.0), (2.0, 3.0), (3.0, 1.0)])
    [0, 1, 3]
"""
from __future__ import annotations

from typing import Sequence


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` is no worse than ``b`` on every objective and better on one (all minimised)."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def nondominated(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the points that no other point dominates, in input order (equal points all stay).

    O(n^2): searches and reports hold tens to hundreds of points, where clarity beats a sort.
    """
    return [i for i, p in enumerate(points) if not any(dominates(q, p) for j, q in enumerate(points) if j != i)]
