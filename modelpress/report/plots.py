"""The report's figures (matplotlib, Agg backend), each returned as PNG bytes.

A figure function returns None when the inputs hold nothing to draw (no compress report: no heat
map), so the report leaves the section out instead of drawing an empty axis.
"""
from __future__ import annotations

import io
import re
from typing import Any, Sequence

import numpy as np

from ..eval.layer_stats import layer_bits, layer_sparsity
from ..search.pareto import nondominated
from .inputs import Inputs, Variant
from .tables import MIB, cost, quality_metric, task_names

#: Roles in the order a decoder block applies them (columns of the heat map); others follow by name.
ROLE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.spines.top": False, "axes.spines.right": False,
                         "axes.grid": True, "grid.alpha": 0.3})
    return plt


def png(fig: Any) -> bytes:
    """The figure as PNG bytes (then closed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def pareto(inputs: Inputs) -> bytes | None:
    """Perplexity against size on disk with the non-dominated points joined: one panel for the
    compared models, one per search (its trials were measured on its own tokens, so they get their
    own axes rather than sharing the models')."""
    panels = []
    pts = [(v.size_bytes / MIB, v.perplexity, v.label) for v in inputs.variants if v.size_bytes and v.perplexity]
    if pts:
        panels.append(("Compared models", pts, True))
    for s in inputs.searches:
        ev = (s.get("identity") or {}).get("evaluation") or {}
        trials = [(r["objectives"]["size_bytes"] / MIB, r["objectives"]["perplexity"], str(r["number"]))
                  for r in s["trials"] if r["state"] == "COMPLETE" and "reused_from" not in r]
        if trials:
            panels.append((f"Search {s['study']}: {len(trials)} trials ({ev.get('eval_max_tokens', '?')} tokens of "
                           f"{ev.get('eval_data', '?')})", trials, False))
    if not panels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.6), squeeze=False)
    for ax, (title, points, named) in zip(axes[0], panels):
        _pareto_panel(ax, points, named)
        ax.set_title(title, fontsize=10)
    return png(fig)


def _pareto_panel(ax: Any, points: list[tuple[float, float, str]], named: bool) -> None:
    front = sorted((points[i] for i in nondominated([(p[0], p[1]) for p in points])), key=lambda p: p[0])
    ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="#d62728", lw=1.5,
            label="Pareto front", zorder=3)
    on_front = {p[2] for p in front}
    for i, (x, y, lab) in enumerate(points):
        colour = PALETTE[i % len(PALETTE)] if named else ("#d62728" if lab in on_front else "#9aa3ae")
        ax.scatter([x], [y], s=70 if named else 36, color=colour, zorder=4, edgecolor="black", lw=0.6)
        ax.annotate(lab if named else f"#{lab}", (x, y), textcoords="offset points", xytext=(6, 5), fontsize=8)
    ax.set_xlabel("size on disk (MiB)")
    _quality_axis(ax, [p[1] for p in points], "perplexity")
    ax.legend(loc="upper right", fontsize=8)


def _quality_axis(ax: Any, ys: Sequence[float], what: str) -> None:
    """Log scale only when the values span more than 8x (plain numbers on the ticks either way)."""
    from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter

    wide = min(ys) > 0 and max(ys) / min(ys) > 8
    if wide:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 100, 200, 500: readable, not 10^2
        ax.yaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel(f"{what}{' (log scale)' if wide else ''}, lower is better")


def _grid(layers: Sequence[dict[str, Any]], value: Any) -> tuple[list[int], list[str], list[list[float]]] | None:
    """(blocks, roles, matrix) of ``value(records of one layer)`` over the decoder blocks' linears."""
    per: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for r in layers:
        m = _BLOCK.search(r["name"])
        if m:
            per.setdefault((int(m.group(1)), r["name"].rsplit(".", 1)[-1]), []).append(r)
    if not per:
        return None
    blocks = sorted({b for b, _ in per})
    found = {role for _, role in per}
    roles = [r for r in ROLE_ORDER if r in found] + sorted(found - set(ROLE_ORDER))
    nan = float("nan")
    grid = [[value(per[(b, r)]) if (b, r) in per else nan for r in roles] for b in blocks]
    return blocks, roles, grid


def heatmaps(variants: Sequence[Variant]) -> bytes | None:
    """Bits per weight per decoder block and role, one panel per compressed variant on one colour
    scale; a second row gives the fraction pruned when any variant pruned."""
    grids = [(v.label, g, _grid(v.layers, layer_sparsity)) for v in variants if (g := _grid(v.layers, layer_bits))]
    if not grids:
        return None
    pruned = any(s is not None and any(x > 0 for row in s[2] for x in row) for _, _, s in grids)
    values = [x for _, g, _ in grids for row in g[2] for x in row if x == x]
    vmin, vmax = min([2.0, *values]), max([8.0, *values])
    plt = _plt()
    nrows, n_blocks = 2 if pruned else 1, max(len(g[0]) for _, g, _ in grids)
    fig, axes = plt.subplots(nrows, len(grids), figsize=(3.2 * len(grids) + 1.2, nrows * (0.08 * n_blocks + 1.6)),
                             squeeze=False)
    for k, (label, bits, sparse) in enumerate(grids):
        rows = [(bits, "bits/weight", "viridis", vmin, vmax)] + ([(sparse, "sparsity", "magma_r", 0.0, 1.0)] if pruned else [])
        for r, (grid, what, cmap, lo, hi) in enumerate(rows):
            im = _draw_grid(axes[r][k], grid, cmap, lo, hi, f"{label}: {what}", first=k == 0)
            if k == len(grids) - 1:
                fig.colorbar(im, ax=list(axes[r]), fraction=0.03, label=what)
    return png(fig)


def _draw_grid(ax: Any, grid: tuple[list[int], list[str], list[list[float]]], cmap: str, lo: float, hi: float,
               title: str, first: bool) -> Any:
    blocks, roles, values = grid
    im = ax.imshow(np.array(values), aspect="auto", cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")  # (blocks, roles)
    ax.set_xticks(range(len(roles)), [r.replace("_proj", "") for r in roles], fontsize=8, rotation=45)
    step = max(1, len(blocks) // 8)
    ax.set_yticks(range(0, len(blocks), step), [str(b) for b in blocks[::step]], fontsize=8)
    if first:
        ax.set_ylabel("decoder block")
    ax.set_title(title, fontsize=9)
    ax.grid(False)
    return im


def slice_deltas(inputs: Inputs, family: str = "data") -> bytes | None:
    """Change of each slice's metric against the baseline, one panel per task, one bar per variant."""
    variants = [v for v in inputs.variants if any(_delta_table(v, t, family) for t in v.tasks)]
    tasks = [t for t in task_names(variants) if any(_delta_table(v, t, family) for v in variants)]
    if not tasks:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.5), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        labels = list(dict.fromkeys(s for v in variants for s in (_delta_table(v, t, family) or {}).get("slices", {})))
        width = 0.8 / len(variants)
        for i, v in enumerate(variants):
            table = _delta_table(v, t, family) or {"slices": {}}
            ys = [table["slices"].get(s, {}).get("delta") for s in labels]
            bars = ax.barh([k + i * width for k in range(len(labels))], [y or 0 for y in ys], height=width,
                           color=PALETTE[(i + 1) % len(PALETTE)], label=v.label)
            for b, s in zip(bars, labels):
                if table["slices"].get(s, {}).get("flagged"):
                    b.set_hatch("///")
                    b.set_edgecolor("black")
        ax.set_yticks([k + 0.4 - width / 2 for k in range(len(labels))], labels, fontsize=8)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_xlabel(f"Δ {quality_metric(next(v.tasks[t] for v in variants if t in v.tasks))} vs baseline")
        ax.set_title(f"{t}: per-slice change (hatched: flagged)")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=len(variants), frameon=False)
    return png(fig)


def _delta_table(v: Variant, task: str, family: str) -> dict[str, Any] | None:
    entry = v.tasks.get(task)
    if not entry:
        return None
    table = ((entry.get("slices") or {}).get(family) or {}).get(quality_metric(entry))
    return table if table and table.get("overall", {}).get("delta") is not None else None


def elasticity(inputs: Inputs, base: Variant | None, family: str = "data") -> bytes | None:
    """Each slice's metric as compression increases: models left to right from largest to smallest on
    disk (evenly spaced, each tick says how many times smaller than the baseline it is)."""
    ordered = sorted((v for v in inputs.variants if v.tasks and v.size_bytes), key=lambda v: -v.size_bytes)
    ref = base.size_bytes if base is not None and base.size_bytes else (ordered[0].size_bytes if ordered else None)
    tasks = task_names(ordered)
    if len(ordered) < 2 or not tasks:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 5.2), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        pts = [v for v in ordered if t in v.tasks]
        xs = list(range(len(pts)))
        metric = quality_metric(pts[0].tasks[t])
        slices = list(dict.fromkeys(s for v in pts for s in _slice_values(v, t, family)))
        for i, s in enumerate(slices):
            ax.plot(xs, [_slice_values(v, t, family).get(s, float("nan")) for v in pts], marker="o", lw=1.2,
                    color=PALETTE[i % len(PALETTE)], label=s, alpha=0.8)
        ax.plot(xs, [v.tasks[t][metric] for v in pts], marker="s", lw=3, color="black", label="all items")
        ax.set_xticks(xs, [f"{v.label}\n{ref / v.size_bytes:.2f}x smaller" for v in pts], fontsize=8)
        ax.set_ylabel(metric)
        ax.set_title(f"{t}: capability elasticity per slice")
        ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    return png(fig)


def _slice_values(v: Variant, task: str, family: str) -> dict[str, float]:
    entry = v.tasks.get(task) or {}
    table = ((entry.get("slices") or {}).get(family) or {}).get(quality_metric(entry)) if entry else None
    return {s: r["value"] for s, r in ((table or {}).get("slices") or {}).items()}


def perf_bars(inputs: Inputs, price_per_hour: float | None) -> bytes | None:
    """Decode latency, time to first token, peak RSS, weights in RAM and cost per million tokens."""
    vs = [v for v in inputs.variants if v.bench]
    if not vs:
        return None
    panels = [("decode ms/token (batch 1)", [v.perf("decode_latency_ms") for v in vs]),
              ("time to first token (ms)", [1e3 * (v.perf("ttft_s") or 0) for v in vs]),
              ("peak RSS (MiB)", [(v.perf("peak_rss_bytes") or 0) / MIB for v in vs]),
              ("weights in RAM (MiB)", [(v.memory_bytes or 0) / MIB for v in vs])]
    if price_per_hour:
        panels.append((f"cost per 1M tokens (at {price_per_hour}/h)", [cost(v, price_per_hour) or 0 for v in vs]))
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.6), squeeze=False)
    for ax, (title, ys) in zip(axes[0], panels):
        bars = ax.bar(range(len(vs)), [y or 0 for y in ys], color=[PALETTE[(i + 1) % len(PALETTE)] for i in range(len(vs))])
        ax.bar_label(bars, labels=[f"{y:.0f}" if y >= 100 else f"{y:.3g}" for y in ys], fontsize=8)
        ax.set_xticks(range(len(vs)), [v.label for v in vs], rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", visible=False)
    fig.tight_layout()
    return png(fig)
