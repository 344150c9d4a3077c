"""JSON + Markdown reports comparing a compressed model with its baseline."""
from __future__ import annotations

import copy
from typing import Any

#: What each number in a report measures (written into eval JSON so no figure is ambiguous).
MEASURES = {
    "size_bytes": "bytes of the model's weight files on disk (null for a model that has no files)",
    "memory_bytes": "bytes of the model's parameters and buffers in RAM",
    "params": "logical parameters (a quantised (out, in) weight counts out*in; tied tensors once)",
    "perplexity": "exp(mean next-token negative log-likelihood) over the scored tokens",
    "tokens": "tokens of evaluation text read (after --max-tokens)",
    "peak_rss_bytes": "peak resident memory of the process so far",
}


def delta_pct(new: float | None, base: float | None) -> float | None:
    if new is None or base is None or base == 0:
        return None
    return 100.0 * (new - base) / base


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    if isinstance(v, int) and v > 10_000:
        return f"{v:,}"
    return str(v)


def comparison(baseline: dict[str, Any] | None, compressed: dict[str, Any]) -> dict[str, Any]:
    """Side-by-side numbers with ratios (compressed / baseline) and ΔPPL%."""
    out = {"baseline": baseline, "compressed": compressed}
    if baseline:
        out["delta_ppl_pct"] = delta_pct(compressed.get("perplexity"), baseline.get("perplexity"))
        for k in ("size_bytes", "memory_bytes"):
            if baseline.get(k) and compressed.get(k):
                out[f"{k}_ratio"] = compressed[k] / baseline[k]
    return out


def with_output_size(report: dict[str, Any], size_bytes: int) -> dict[str, Any]:
    """A copy of a compress report whose compressed size is the saved files' bytes.

    The evaluation runs before saving, when only the in-memory model exists; its "size on disk" is
    known once the files are written.
    """
    rep = copy.deepcopy(report)
    rep["size_bytes"] = size_bytes
    ev = rep.get("eval")
    if ev and ev.get("compressed") is not None:
        ev["compressed"]["size_bytes"] = size_bytes
        rep["eval"] = comparison(ev.get("baseline"), ev["compressed"])
    return rep


def markdown(report: dict[str, Any]) -> str:
    """Human-readable report: summary, evaluation table, per-layer table, warnings."""
    lines = [f"# modelpress report: {report.get('model', '?')}", ""]
    if report.get("recipe"):
        lines += [f"Recipe: `{report['recipe'].get('name', 'custom')}` — {report['recipe'].get('description', '')}", ""]
    ev = report.get("eval")
    if ev:
        lines += _eval_table(ev)
    lines += _summary_lines(report)
    if report.get("layers"):
        lines += _layer_table(report["layers"])
    if report.get("warnings"):
        lines += ["## Notes", ""] + [f"- {w}" for w in report["warnings"]] + [""]
    return "\n".join(lines)


def _eval_table(ev: dict[str, Any]) -> list[str]:
    b, c = ev.get("baseline") or {}, ev.get("compressed") or {}
    rows = [("perplexity", "perplexity"), ("tokens", "tokens"), ("seq_len", "seq_len"), ("params", "params"),
            ("size on disk (bytes of the weight files)", "size_bytes"),
            ("memory (bytes of parameters and buffers in RAM)", "memory_bytes"), ("eval time (s)", "eval_s")]
    out = ["## Evaluation", "", "| metric | baseline | compressed |", "|---|---|---|"]
    out += [f"| {label} | {_fmt(b.get(k))} | {_fmt(c.get(k))} |" for label, k in rows]
    if ev.get("delta_ppl_pct") is not None:
        out.append(f"| ΔPPL | | {ev['delta_ppl_pct']:+.2f}% |")
    if ev.get("size_bytes_ratio") is not None:
        out.append(f"| size on disk, compressed / baseline | | {ev['size_bytes_ratio']:.3f} |")
    return out + [""]


def _summary_lines(report: dict[str, Any]) -> list[str]:
    keys = [("compress time (s)", "compress_s"), ("load time (s)", "load_s"), ("save time (s)", "save_s"),
            ("peak RSS (bytes, whole process)", "peak_rss_bytes"), ("output size on disk (bytes of the weight files)", "size_bytes"),
            ("quantised layers", "n_quantized"),
            ("mean bits/weight (quantised layers)", "mean_bits_per_weight")]
    out = ["## Run", "", "| | |", "|---|---|"]
    out += [f"| {label} | {_fmt(report.get(k))} |" for label, k in keys if report.get(k) is not None]
    return out + [""]


def _layer_table(layers: list[dict[str, Any]]) -> list[str]:
    out = ["## Layers", "", "| layer | method | format | bits/w | rel. weight err | rel. output err |", "|---|---|---|---|---|---|"]
    for r in layers:
        f = r.get("fmt") or {}
        fdesc = ", ".join(f"{k}={v}" for k, v in f.items() if k not in ("scale_dtype",)) if f else "-"
        out.append(f"| {r['name']} | {r['method']} | {fdesc} | {_fmt(r.get('bits_per_weight'), 3)} | "
                   f"{_fmt(r.get('rel_error'), 4)} | {_fmt(r.get('out_rel_error'), 4)} |")
    return out + [""]
