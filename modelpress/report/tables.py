"""The report's tables as plain data (a header and rows of strings), rendered alike to HTML and Markdown.

Every number is printed from the input files as they hold it, with a fixed number of decimals, so
a reader (and the tests) can find each figure of an input in the report.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..eval.layer_stats import mean_final_bits
from ..eval.perf import cost_per_million
from .inputs import Inputs, Variant

MIB = 2**20


@dataclass(frozen=True)
class Table:
    """A titled table; ``marked`` rows (by index) are highlighted (a flagged slice, a regression)."""

    title: str
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    note: str = ""
    marked: frozenset[int] = field(default_factory=frozenset)
    collapsed: bool = False  # HTML: folded under its title (long detail tables)


def fmt(v: Any, nd: int = 3) -> str:
    """A number as the report prints it ('-' when absent)."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def quality_metric(task: dict[str, Any]) -> str:
    """The metric a task is summarised by: acc_norm for multiple choice, else acc, else exact match."""
    return next(m for m in ("acc_norm", "acc", "exact_match") if m in task)


def task_names(variants: Sequence[Variant]) -> list[str]:
    """Every task any variant was evaluated on, in first-seen order."""
    return list(dict.fromkeys(t for v in variants for t in v.tasks))


def flip_rate(task: dict[str, Any]) -> float | None:
    """Share of items whose answer changed against the baseline, for the metric the task is shown by
    (acc_norm's own flips when that is the metric)."""
    if not task:
        return None
    flips = task.get("flips_norm") if quality_metric(task) == "acc_norm" else task.get("flips")
    return (flips or {}).get("flip_rate", task.get("flip_rate"))


def cost(v: Variant, price_per_hour: float | None) -> float | None:
    """Price per million generated tokens at batch 1 (machine price / decode throughput)."""
    tps = v.perf("decode_tokens_per_s")
    return cost_per_million(price_per_hour, tps) if tps else None


def summary(inputs: Inputs, base: Variant | None) -> Table:
    """One row per variant: size, bits, perplexity, each task's metric and flip rate, KL, decode speed."""
    tasks = task_names(inputs.variants)
    header = ["model", "size MiB", "x smaller", "bits/weight", "perplexity", "ΔPPL %"]
    for t in tasks:
        m = quality_metric(_any_task(inputs, t))
        header += [f"{t} {m}", f"{t} flips"]
    header += ["KL nats", "decode tok/s"]
    rows = []
    for v in inputs.variants:
        size, ppl = v.size_bytes, v.perplexity
        ratio = base.size_bytes / size if base is not None and base.size_bytes and size else None
        dppl = 100 * (ppl - base.perplexity) / base.perplexity if base is not None and base.perplexity and ppl else None
        row = [v.label, fmt(size / MIB if size else None, 1), fmt(ratio, 2), fmt(v.bits_per_weight, 2), fmt(ppl, 3),
               "-" if dppl is None else f"{dppl:+.1f}"]
        for t in tasks:
            entry = v.tasks.get(t) or {}
            row += [fmt(entry.get(quality_metric(entry)) if entry else None, 4), fmt(flip_rate(entry), 4)]
        kl = ((v.eval or {}).get("agreement") or {}).get("kl")
        row += [fmt(kl, 4), fmt(v.perf("decode_tokens_per_s"), 1)]
        rows.append(tuple(row))
    note = (f"x smaller and ΔPPL against {base.label}. " if base is not None else "") + (
        "Size: bytes of the weight files on disk; flips: share of items whose answer (by the metric shown) changed "
        "against the eval's baseline; KL: next-token KL(baseline || model); decode tok/s at batch 1.")
    return Table("Summary", tuple(header), tuple(rows), note)


def _any_task(inputs: Inputs, name: str) -> dict[str, Any]:
    return next(v.tasks[name] for v in inputs.variants if name in v.tasks)


def slice_rows(inputs: Inputs, families: Sequence[str] | None = None, title: str = "Per-slice results",
               collapsed: bool = False) -> Table:
    """Per task and slice (of ``families``, default all): each variant's metric on the slice and its
    change against its baseline."""
    variants = [v for v in inputs.variants if v.tasks]
    header = ("task", "slicing", "slice", "n", *[f"{v.label} (Δ)" for v in variants])
    rows, marked = [], set()
    for t in task_names(variants):
        for fam, label, n in _slice_keys(variants, t, families):
            cells, flagged = [], False
            for v in variants:
                r = _slice(v, t, fam, label)
                cells.append("-" if r is None else fmt(r["value"], 3) +
                             ("" if r.get("delta") is None else f" ({r['delta']:+.3f})"))
                flagged |= bool(r and r.get("flagged"))
            if flagged:
                marked.add(len(rows))
            rows.append((t, fam, label, str(n), *cells))
    return Table(title, header, tuple(rows),
                 "Each cell: the model's metric on the slice (its change against the eval's baseline). "
                 "Highlighted: flagged by the eval as far worse than the whole.", frozenset(marked), collapsed)


def slice_families(inputs: Inputs) -> list[str]:
    """Slicings present in any task ('data' first: the labels the data set itself gives)."""
    fams = dict.fromkeys(f for v in inputs.variants for e in v.tasks.values() for f in (e.get("slices") or {}))
    return sorted(fams, key=lambda f: (f != "data", f))


def _slice_keys(variants: Sequence[Variant], task: str, families: Sequence[str] | None) -> list[tuple[str, str, int]]:
    keys: dict[tuple[str, str], int] = {}
    for v in variants:
        metric_tables = ((v.tasks.get(task) or {}).get("slices") or {})
        for fam, per_metric in metric_tables.items():
            if families is not None and fam not in families:
                continue
            table = per_metric.get(quality_metric(v.tasks[task])) or {}
            keys.update({(fam, "(all)"): table.get("overall", {}).get("n", 0)})
            for s, r in (table.get("slices") or {}).items():
                keys.setdefault((fam, s), r["n"])
    return [(f, s, n) for (f, s), n in keys.items()]


def _slice(v: Variant, task: str, fam: str, label: str) -> dict[str, Any] | None:
    entry = v.tasks.get(task)
    if not entry:
        return None
    table = ((entry.get("slices") or {}).get(fam) or {}).get(quality_metric(entry)) or {}
    return table.get("overall") if label == "(all)" else (table.get("slices") or {}).get(label)


def behaviour(inputs: Inputs) -> Table | None:
    """Prompt by prompt: pass or fail per variant, whether the output changed, checks that regressed."""
    variants = [v for v in inputs.variants if v.behaviour]
    if not variants:
        return None
    ids = list(dict.fromkeys(p["id"] for v in variants for p in v.behaviour["prompts"]))
    header = ("prompt", *[v.label for v in variants])
    rows, marked = [], set()
    for pid in ids:
        cells = []
        for v in variants:
            p = next((p for p in v.behaviour["prompts"] if p["id"] == pid), None)
            cells.append("-" if p is None else _behaviour_cell(p))
            if p is not None and p.get("regressed"):
                marked.add(len(rows))
        rows.append((pid, *cells))
    summ = [f"{v.label}: {v.behaviour['summary']['prompts_passed']}/{v.behaviour['summary']['prompts']} prompts pass"
            + (f", {v.behaviour['summary']['outputs_changed']} outputs changed, "
               f"{v.behaviour['summary']['regressions']} regressions" if "outputs_changed" in v.behaviour["summary"] else "")
            for v in variants]
    return Table("Behavioural checks", header, tuple(rows), "; ".join(summ) + ". Highlighted: a check that passed on "
                 "the baseline fails.", frozenset(marked))


def behaviour_outputs(inputs: Inputs, width: int = 70) -> Table | None:
    """What each model answered, prompt by prompt (cut to ``width`` characters)."""
    variants = [v for v in inputs.variants if v.behaviour]
    if not variants:
        return None
    ids = list(dict.fromkeys(p["id"] for v in variants for p in v.behaviour["prompts"]))
    rows = []
    for pid in ids:
        cells = []
        for v in variants:
            p = next((p for p in v.behaviour["prompts"] if p["id"] == pid), None)
            text = "-" if p is None else " ".join(p["output"].split())
            cells.append(text if len(text) <= width else text[: width - 1] + "…")
        rows.append((pid, *cells))
    return Table("What each model said", ("prompt", *[v.label for v in variants]), tuple(rows), collapsed=True)


def _behaviour_cell(p: dict[str, Any]) -> str:
    out = "pass" if p["passed"] else "FAIL " + ",".join(c["name"] for c in p["checks"] if not c["passed"])
    if "same_output" in p:
        out += "; same output" if p["same_output"] else "; output changed"
    if p.get("regressed"):
        out += "; regressed: " + ",".join(p["regressed"])
    return out


def search_front(search: dict[str, Any]) -> Table:
    """A search's Pareto front, best perplexity first."""
    by_number = {r["number"]: r for r in search["trials"]}
    front = sorted((by_number[n] for n in search["pareto"]), key=lambda r: r["objectives"]["perplexity"])
    names = list(front[0]["params"]) if front else []
    rows = tuple((str(r["number"]), *[fmt(r["params"][k], 3) for k in names], fmt(r["objectives"]["perplexity"], 3),
                  fmt(r["objectives"]["size_bytes"] / MIB, 2), fmt(r["objectives"]["latency_ms"], 2),
                  fmt(_trial_bits(search, r), 2)) for r in front)
    c = search.get("counts", {})
    return Table(f"Search {search['study']}: Pareto front", ("trial", *names, "perplexity", "size MiB", "ms/token",
                                                               "bits/weight"), rows,
                 f"{len(front)} of {c.get('COMPLETE', 0)} measured trials are Pareto-optimal in perplexity, size "
                 f"and decode latency ({c.get('FAIL', 0)} failed, {c.get('REUSED', 0)} proposals repeated a "
                 "measured recipe).")


def _trial_bits(search: dict[str, Any], trial: dict[str, Any]) -> float | None:
    """Mean stored bits per weight of a trial, from its compress report's layers when the search
    folder still holds it (what each layer finally stores), else the search's own figure."""
    rep = Path(search["path"]).parent / str(trial.get("folder", "")) / "compress_report.json"
    if trial.get("folder") and rep.is_file():
        return mean_final_bits(json.loads(rep.read_text())["layers"])
    return (trial.get("measures") or {}).get("bits_per_weight")


def perf_rows(inputs: Inputs, price_per_hour: float | None) -> Table | None:
    """Latency, throughput, memory and cost per variant (from bench inputs)."""
    variants = [v for v in inputs.variants if v.bench]
    if not variants:
        return None
    rows = []
    for v in variants:
        ttft, rss, mem = v.perf("ttft_s"), v.perf("peak_rss_bytes"), v.memory_bytes
        rows.append((v.label, fmt(v.perf("decode_latency_ms"), 2), fmt(v.perf("decode_tokens_per_s"), 1),
                     fmt(ttft * 1e3 if ttft else None, 1), fmt(rss / MIB if rss else None, 0),
                     fmt(mem / MIB if mem else None, 1), fmt(cost(v, price_per_hour), 4)))
    return Table("Latency, memory and cost", ("model", "decode ms/token", "decode tok/s", "TTFT ms", "peak RSS MiB",
                                              "weights in RAM MiB", f"cost per 1M tokens (at {price_per_hour}/h)"),
                 tuple(rows), "Batch 1, each model measured in its own process; cost = price per hour / "
                 "(3600 x decode tokens/s) x 1e6.")
