"""Slice-aware evaluation: any per-item metric broken down by slice, and slices that degrade far more
than the whole are flagged.

Slices come from the data (an item's ``slice``) or are derived: prompt length in tokens and the
share of rare tokens (tokens seen less than ``rare_below`` of the time in a reference text), each
cut into equal-count buckets. With a baseline, each slice's change is compared with the overall
change on the same items (paired):

    d_i   = new_i - base_i                 (sign flipped for lower-is-better metrics)
    gap_s = mean_{i in s} d_i - mean_all d_i
    se_s  = sd_all(d) * sqrt(1/n_s - 1/N)   (spread of gap_s if the slice were a random subset)
    flag s  when  mean_{i in s} d_i < 0  and  gap_s < -max(z * se_s, min_gap)

so a slice is flagged only when it got worse, and its extra loss is both beyond chance (``z``
standard errors of a random subset of its size) and large enough to matter (``min_gap``, in the
metric's units). A uniform degradation moves every slice with the mean and flags none.

Example:
    >>> t = slice_table([1, 1, 1, 1, 0, 1], [1, 1, 1, 1, 0, 0], ["a", "a", "a", "a", "b", "b"])  # doctest: +SKIP
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Any, Sequence

import numpy as np

#: A slice needs at least this many items to be flagged (smaller ones are listed, never flagged).
MIN_ITEMS = 5


def quantile_buckets(values: Sequence[float], n_buckets: int, name: str, fmt: str = "{:g}") -> list[str]:
    """Label each value with its equal-count bucket, e.g. ``"length 12-40"`` (ties share a bucket)."""
    v = np.asarray(values, dtype=float)
    edges = np.unique(np.quantile(v, np.linspace(0, 1, n_buckets + 1)[1:-1])) if v.size else np.array([])
    idx = np.searchsorted(edges, v, side="right")  # bucket b holds edges[b-1] < v <= ... (right-closed below)
    labels = []
    for b in range(len(edges) + 1):
        members = v[idx == b]
        labels.append(f"{name} {fmt.format(members.min())}-{fmt.format(members.max())}" if members.size else "")
    return [labels[b] for b in idx]


def rare_rates(token_lists: Sequence[Sequence[int]], reference: Counter, total: int, rare_below: float = 1e-5) -> list[float]:
    """Share of each item's tokens whose frequency in the reference is below ``rare_below``."""
    limit = rare_below * total
    return [sum(reference.get(t, 0) < limit for t in toks) / max(len(toks), 1) for toks in token_lists]


def derived_slices(token_lists: Sequence[Sequence[int]], reference: Counter | None = None, total: int = 0,
                   n_buckets: int = 3, rare_below: float = 1e-5) -> dict[str, list[str]]:
    """Length buckets, and rare-token-rate buckets when a reference count is given."""
    out = {"length": quantile_buckets([len(t) for t in token_lists], n_buckets, "tokens", "{:.0f}")}
    if reference is not None and total:
        rates = rare_rates(token_lists, reference, total, rare_below)
        out["rare_tokens"] = quantile_buckets([100 * r for r in rates], n_buckets, "rare %", "{:.1f}")
    return out


def slice_table(base: Sequence[float] | None, new: Sequence[float], labels: Sequence[str | None], *,
                higher_is_better: bool = True, z: float = 3.0, min_gap: float = 0.02) -> dict[str, Any]:
    """Per-slice mean of a per-item metric (and its change against the baseline, flagged if far worse)."""
    new_a = np.asarray(new, dtype=float)
    base_a = None if base is None else np.asarray(base, dtype=float)
    sign = 1.0 if higher_is_better else -1.0
    d = None if base_a is None else sign * (new_a - base_a)  # (n,) paired change, > 0 is better
    groups: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        if lab is not None and lab != "":
            groups.setdefault(str(lab), []).append(i)
    out: dict[str, Any] = {"overall": _row(new_a, base_a), "slices": {}, "flagged": []}
    for lab, idx in sorted(groups.items()):
        row = _row(new_a[idx], None if base_a is None else base_a[idx])
        if d is not None:
            row.update(_flag(d[idx], d, z, min_gap))
            if row["flagged"]:
                out["flagged"].append(lab)
        out["slices"][lab] = row
    return out


def _row(new: np.ndarray, base: np.ndarray | None) -> dict[str, Any]:
    row: dict[str, Any] = {"n": int(new.size), "value": float(new.mean())}
    if base is not None:
        row.update(baseline=float(base.mean()), delta=float(new.mean() - base.mean()))
    return row


def _flag(d_s: np.ndarray, d: np.ndarray, z: float, min_gap: float) -> dict[str, Any]:
    gap = float(d_s.mean() - d.mean())
    se = float(d.std(ddof=1)) * math.sqrt(max(1 / d_s.size - 1 / d.size, 0.0)) if d.size > 1 else 0.0
    threshold = max(z * se, min_gap)
    worse = d_s.size >= MIN_ITEMS and d_s.mean() < 0 and gap < -threshold
    return {"gap_vs_overall": gap, "threshold": threshold, "flagged": bool(worse)}
