"""``modelpress report``: one self-contained HTML file and a Markdown summary of compression results.

The HTML holds everything it shows (styles inline, figures as base64 PNG ``data:`` URIs, no
script, no external link), so it can be mailed or attached to a CI run and opened offline. The
Markdown has the same tables and links the same figures, written as PNG files beside it
(``OUT_files/``).

Sections, each left out when no input has what it needs: summary table; quality vs size with the
Pareto front (variants and search trials); per-layer bits / sparsity heat maps (compress reports);
per-slice changes and the capability-elasticity curve (eval JSONs with task slices); behavioural
checks; latency, memory and cost per token (bench JSONs); each search's Pareto front.

Example:
    >>> write_report(read_inputs(["fp32=a.json", "w4=b.json"]), ReportOptions(), "r.html", "r.md")  # doctest: +SKIP
"""
from __future__ import annotations

import base64
import html
import re
import time
from dataclasses import dataclass
from pathlib import Path

from . import plots, tables
from .inputs import Inputs, Variant, pick_baseline
from .tables import Table

CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:0;background:#f6f7f9;color:#1d2430}
main{max-width:1320px;margin:0 auto;padding:24px 32px 64px}
h1{font-size:26px;margin:8px 0 4px}h2{font-size:19px;margin:0 0 10px;color:#23395d}
.sub{color:#5b6575;margin:0 0 18px}
section{background:#fff;border:1px solid #e2e5ea;border-radius:8px;padding:16px 20px;margin:0 0 18px}
table{border-collapse:collapse;font-size:13px;margin:6px 0;width:auto}
th,td{border-bottom:1px solid #e8eaee;padding:4px 10px;text-align:right;white-space:nowrap}
th{background:#eef1f6;font-weight:600}td.t,th.t{text-align:left}
.scroll{overflow-x:auto}details{margin:8px 0}summary{cursor:pointer;color:#23395d;font-weight:600}
h3{font-size:15px;margin:12px 0 4px}
tr.mark td{background:#fde8e6}
.note{color:#5b6575;font-size:12px;margin:4px 0 8px}
img{max-width:100%;height:auto;display:block;margin:8px 0}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:0 0 18px}
.card{background:#fff;border:1px solid #e2e5ea;border-radius:8px;padding:10px 16px;min-width:170px}
.card b{display:block;font-size:20px}.card span{color:#5b6575;font-size:12px}
"""


@dataclass(frozen=True)
class ReportOptions:
    """What the report compares against and how it prices a token."""

    title: str = "modelpress report"
    note: str = ""  # provenance shown under the title (machine, load, data)
    baseline: str | None = None
    price_per_hour: float | None = 1.0


@dataclass(frozen=True)
class Section:
    """A titled block: text, tables, and figures (name, PNG bytes)."""

    title: str
    intro: str = ""
    tables: tuple[Table, ...] = ()
    figures: tuple[tuple[str, bytes], ...] = ()


def sections(inputs: Inputs, opts: ReportOptions) -> list[Section]:
    """Every section the inputs allow, in reading order."""
    base = pick_baseline(inputs, opts.baseline)
    out = [Section("Summary", tables=(tables.summary(inputs, base),))]
    fig = plots.pareto(inputs)
    if fig:
        out.append(Section("Quality vs size: Pareto front", "Perplexity against size on disk; the red step joins "
                           "the points that no other point is both smaller and better than. Search trials are "
                           "measured on the search's own tokens, so they have their own panel.",
                           figures=(("pareto", fig),)))
    maps = tuple((n, f) for n, f in (("layers", plots.heatmaps(inputs.variants)),) if f)
    if maps:
        out.append(Section("Per-layer bits and sparsity", "Stored bits per weight (scales and zero points included) "
                           "of every linear in each decoder block, from the compress reports; a second panel shows the "
                           "fraction pruned when a stage pruned.", figures=maps))
    out += _slice_sections(inputs, base)
    beh = tables.behaviour(inputs)
    if beh:
        out.append(Section("Behavioural changes", tables=tuple(t for t in (beh, tables.behaviour_outputs(inputs)) if t)))
    perf, fig = tables.perf_rows(inputs, opts.price_per_hour), plots.perf_bars(inputs, opts.price_per_hour)
    if perf:
        out.append(Section("Latency, memory and cost per token", tables=(perf,),
                           figures=(("perf", fig),) if fig else ()))
    for s in inputs.searches:
        out.append(Section(f"Search: {s['study']}", f"Storage {s['storage']}; objectives "
                           f"{', '.join(s['objectives'])} (all minimised); its trials are the right-hand panel "
                           "of the quality vs size plot.", tables=(tables.search_front(s),)))
    return out


def _slice_sections(inputs: Inputs, base: Variant | None) -> list[Section]:
    fams = tables.slice_families(inputs)
    if not fams:
        return []
    rows = (tables.slice_rows(inputs, fams[:1], f"Per-slice results ({fams[0]} slices)"),)
    if fams[1:]:
        rows += (tables.slice_rows(inputs, fams[1:], f"Per-slice results ({', '.join(fams[1:])} slices)", True),)
    out = []
    figs = tuple((n, f) for n, f in (("slices", plots.slice_deltas(inputs)),) if f)
    out.append(Section("Per-slice deltas", "How each slice of each task moved against the baseline of its eval "
                       "(slices from the data's labels, prompt length and rare-token share).", rows, figs))
    el = plots.elasticity(inputs, base)
    if el:
        out.append(Section("Capability elasticity", "Each slice's metric as compression increases: models left to "
                           "right from largest to smallest on disk, each labelled with how many times smaller than the "
                           "baseline it is. A slice that falls faster than the black line (all items) is the capability "
                           "compression costs first; a slice of n items moves in steps of 1/n.", figures=(("elasticity", el),)))
    return out


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in s)


_NUMERIC = re.compile(r"^(-|[-+]?[\d.,]+(x|%)?( \([-+]?[\d.]+\))?)$")


def _td(c: str) -> str:
    cls = "" if _NUMERIC.match(c) else ' class="t"'  # numbers right-aligned, text left
    return f"<td{cls}>{html.escape(c)}</td>"


def _html_table(t: Table, section_title: str) -> str:
    text_cols = {j for j in range(len(t.header)) if any(not _NUMERIC.match(r[j]) for r in t.rows)}
    left = ' class="t"'
    head = "".join(f"<th{left if j in text_cols else ''}>{html.escape(h)}</th>" for j, h in enumerate(t.header))
    mark = ' class="mark"'
    body = "".join(f"<tr{mark if i in t.marked else ''}>" + "".join(_td(c) for c in r) + "</tr>"
                   for i, r in enumerate(t.rows))
    note = f"<p class=\"note\">{html.escape(t.note)}</p>" if t.note else ""
    table = f"<div class=\"scroll\"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>{note}"
    if t.collapsed:
        return f"<details><summary>{html.escape(t.title)}</summary>{table}</details>"
    return ("" if t.title == section_title else f"<h3>{html.escape(t.title)}</h3>") + table


def _cards(inputs: Inputs, opts: ReportOptions) -> str:
    base = pick_baseline(inputs, opts.baseline)
    cards = [(str(len(inputs.variants)), "models compared")]
    if base is not None:
        cards.append((base.label, "baseline"))
    sized = [v for v in inputs.variants if v.size_bytes and base is not None and base.size_bytes]
    if sized:
        best = max(sized, key=lambda v: base.size_bytes / v.size_bytes)
        cards.append((f"{base.size_bytes / best.size_bytes:.1f}x", f"smallest: {best.label}"))
    trials = sum(s.get("counts", {}).get("COMPLETE", 0) for s in inputs.searches)
    if trials:
        cards.append((str(trials), "search trials measured"))
    return "<div class=\"cards\">" + "".join(f"<div class=\"card\"><b>{html.escape(a)}</b><span>{html.escape(b)}</span></div>"
                                            for a, b in cards) + "</div>"


def to_html(inputs: Inputs, opts: ReportOptions, secs: list[Section]) -> str:
    """The whole report as one HTML document with nothing outside it."""
    parts = [f"<h1>{html.escape(opts.title)}</h1><p class=\"sub\">Generated by modelpress report on "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from {sum(len(v.sources) for v in inputs.variants) + len(inputs.searches)} "
             "input files.</p>" + (f"<p class=\"sub\">{html.escape(opts.note)}</p>" if opts.note else ""),
             _cards(inputs, opts)]
    for s in secs:
        body = f"<p class=\"note\">{html.escape(s.intro)}</p>" if s.intro else ""
        body += "".join(_html_table(t, s.title) for t in s.tables)
        body += "".join(f"<img alt=\"{html.escape(n)}\" src=\"data:image/png;base64,{base64.b64encode(b).decode()}\">"
                        for n, b in s.figures)
        parts.append(f"<section id=\"{_slug(s.title)}\"><h2>{html.escape(s.title)}</h2>{body}</section>")
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(opts.title)}</title>"
            f"<style>{CSS}</style></head><body><main>{''.join(parts)}</main></body></html>\n")


def _md_cell(c: str) -> str:
    return c.replace("|", "\\|")


def _md_table(t: Table) -> list[str]:
    lines = ["| " + " | ".join(map(_md_cell, t.header)) + " |", "|---" * len(t.header) + "|"]
    lines += ["| " + " | ".join(_md_cell(f"**{c}**" if i in t.marked and j == 0 else c) for j, c in enumerate(r)) + " |"
              for i, r in enumerate(t.rows)]
    return lines + ([""] + [t.note] if t.note else []) + [""]


def to_markdown(opts: ReportOptions, secs: list[Section], figure_dir: Path, md_path: Path) -> str:
    """The Markdown summary; figures are written to ``figure_dir`` and linked relative to ``md_path``."""
    lines = [f"# {opts.title}", ""] + ([opts.note, ""] if opts.note else [])
    for s in secs:
        lines += [f"## {s.title}", ""] + ([s.intro, ""] if s.intro else [])
        for t in s.tables:
            lines += ([] if t.title == s.title else [f"### {t.title}", ""]) + _md_table(t)
        for name, data in s.figures:
            figure_dir.mkdir(parents=True, exist_ok=True)
            (figure_dir / f"{name}.png").write_bytes(data)
            lines += [f"![{name}]({(figure_dir / f'{name}.png').relative_to(md_path.parent).as_posix()})", ""]
    return "\n".join(lines)


def write_report(inputs: Inputs, opts: ReportOptions, html_path: str | Path | None,
                 md_path: str | Path | None) -> list[Path]:
    """Write the HTML and/or Markdown report; returns the files written."""
    secs = sections(inputs, opts)
    written = []
    if html_path is not None:
        p = Path(html_path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(to_html(inputs, opts, secs), encoding="utf-8")
        written.append(p)
    if md_path is not None:
        p = Path(md_path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(to_markdown(opts, secs, p.parent / f"{p.stem}_files", p), encoding="utf-8")
        written.append(p)
    return written
