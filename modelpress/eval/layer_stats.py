"""Per-layer figures from a compress report's records, where one layer can have several records
(a pruning stage, then a quantiser): what the saved layer finally stores.

Example:
    >>> recs = [{"name": "l", "fmt": {"sparsity": 0.5}, "bits_per_weight": 17.0},
    ...         {"name": "l", "fmt": {"type": "int", "bits": 4}, "bits_per_weight": 4.5}]
    >>> layer_bits(recs), layer_sparsity(recs), mean_final_bits(recs)
    (4.5, 0.5, 4.5)
"""
from __future__ import annotations

from typing import Any, Sequence


def by_layer(records: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Records grouped by layer name, in report order."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        out.setdefault(r["name"], []).append(r)
    return out


def layer_bits(recs: Sequence[dict[str, Any]]) -> float:
    """Stored bits per weight of one layer: its last quantiser's figure, else its last record's (NaN if none)."""
    quant = [r for r in recs if (r.get("fmt") or {}).get("bits") is not None and r.get("bits_per_weight")]
    pick = (quant or [r for r in recs if r.get("bits_per_weight")] or [{}])[-1]
    return pick.get("bits_per_weight") or float("nan")


def layer_sparsity(recs: Sequence[dict[str, Any]]) -> float:
    """Fraction of one layer's weights a pruning stage zeroed (0 when none did)."""
    for r in reversed(recs):
        f = r.get("fmt") or {}
        pat = f.get("pattern") or {}
        if isinstance(pat, dict) and pat.get("type") == "nm":
            return 1 - pat["n"] / pat["m"]
        if f.get("sparsity") is not None:
            return float(f["sparsity"])
    return 0.0


def mean_final_bits(records: Sequence[dict[str, Any]]) -> float | None:
    """Mean over layers of what each finally stores (the runner's mean averages every stage's records,
    so a pruned-then-quantised layer would count twice)."""
    bits = [b for recs in by_layer(records).values() if (b := layer_bits(recs)) == b]
    return sum(bits) / len(bits) if bits else None
