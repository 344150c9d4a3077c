"""Allocated vs uniform at the same budget: ``mixed-w3`` vs ``gptq-w3-g64`` (same bytes) and
``mixed-sparse-60`` vs uniform SparseGPT 60% (same weights pruned), ΔPPL each, on one model.

Loads the model once, evaluates the float baseline, then for each recipe: copy the model, compress
(CPU seconds: all threads of this process), evaluate on the same tokens, and count what the
size accounting counts (stored bytes of the quantised layers, fraction of weights pruned). The
mixed rows also give the allocation, the sensitivity measurement's cost and the Spearman rank
correlation of the proxy ``tr(E H E^T)`` with the measured KL. Writes JSON + Markdown after
every row (a stopped run keeps what it measured).

    python bench/mixed_precision.py --threads 2 --out bench/results/mixed_precision
    # or the two pairs as two 1-thread processes, then one table:
    python bench/mixed_precision.py --threads 1 --only quant --out bench/results/mixed_precision_quant
    python bench/mixed_precision.py --threads 1 --only sparse --out bench/results/mixed_precision_sparse
    python bench/mixed_precision.py --merge bench/results/mixed_precision_quant.json \
        bench/results/mixed_precision_sparse.json --out bench/results/mixed_precision
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _compress_setup import float_model_and_eval  # noqa: E402

UNIFORM_SPARSE = {"name": "sparsegpt-60", "stages": [{"method": "sparsegpt", "ignore": ["lm_head"],
                                                      "pattern": "unstructured", "sparsity": 0.6}]}
PAIRS = [("gptq-w3-g64", "mixed-w3"), (UNIFORM_SPARSE, "mixed-sparse-60")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bundled:smollm2-135m-instruct")
    ap.add_argument("--eval-data", default="bundled:wikitext2")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--eval-seq-len", type=int, default=1024)
    ap.add_argument("--calib", default="bundled:c4")
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=["quant", "sparse"], help="run one pair only")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="only join these runs' rows into one table")
    ap.add_argument("--out", required=True, help="output path without extension (.json and .md are written)")
    args = ap.parse_args()
    if args.merge:
        return merge(args.merge, args.out)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MODELPRESS_PROGRESS", "0")
    import modelpress as mp

    base_lm, calib, ppl, fresh = float_model_and_eval(args)

    meta = {k: getattr(args, k) for k in ("model", "eval_data", "eval_tokens", "eval_seq_len", "calib",
                                           "calib_samples", "calib_seq_len", "threads")}
    meta.update(torch=torch.__version__, cpus=os.cpu_count(), load_avg_start=os.getloadavg())
    c = time.process_time()
    base = ppl(base_lm.module)
    rows = [{"recipe": "baseline (fp32)", "perplexity": base, "delta_ppl": 0.0, "eval_cpu_s": time.process_time() - c}]
    print(json.dumps(rows[-1]), flush=True)
    pairs = PAIRS if args.only is None else PAIRS[:1] if args.only == "quant" else PAIRS[1:]
    for pair in pairs:
        for recipe in pair:
            lm = fresh()
            c, t = time.process_time(), time.perf_counter()
            rep = mp.compress(lm, recipe, calib=calib, progress=False)
            row = {"recipe": recipe if isinstance(recipe, str) else recipe["name"],
                   "compress_cpu_s": time.process_time() - c, "compress_wall_s": time.perf_counter() - t,
                   **sizes(lm.module), **allocation(rep)}
            c = time.process_time()
            row["perplexity"] = ppl(lm.module)
            row["delta_ppl"] = row["perplexity"] - base
            row["eval_cpu_s"] = time.process_time() - c
            row["load_avg"] = os.getloadavg()
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "allocation_table"}), flush=True)
            write(args.out, meta, rows)
    write(args.out, meta, rows)


def merge(paths: list[str], out: str) -> None:
    """One table from runs of the pairs: the first run's baseline, each run's compressed rows."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    rows = runs[0]["rows"][:1] + [r for run in runs for r in run["rows"][1:]]
    meta = {**runs[0]["meta"], "baselines": [run["rows"][0]["perplexity"] for run in runs], "merged_from": paths}
    write(out, meta, rows)


def sizes(model: torch.nn.Module) -> dict:
    """What the size accounting counts: stored bytes of quantised layers, weights pruned."""
    from modelpress.quant.qlinear import QuantLinear
    from modelpress.sparsity.layer import SparseLayer

    q = [m for m in model.modules() if isinstance(m, QuantLinear)]
    s = [m for m in model.modules() if isinstance(m, SparseLayer)]
    out = {}
    if q:
        nb, n = sum(m.stored_bytes() for m in q), sum(m.in_features * m.out_features for m in q)
        out.update(quant_layers=len(q), quant_bytes=nb, bits_per_weight=8 * nb / n)
    if s:
        zeros, n = sum(int((~m.mask).sum()) for m in s), sum(m.mask.numel() for m in s)
        out.update(sparse_layers=len(s), weights=n, pruned=zeros, sparsity=zeros / n)
    return out


def allocation(rep: dict) -> dict:
    """The mixed stages' allocation, its cost against the budget, and the proxy's rank correlation."""
    for st in rep["stages"]:
        for m in st.get("metrics", []):
            if "allocation" in m:
                sens = m["sensitivity"]
                counts: dict[str, int] = {}
                for lab in m["allocation"].values():
                    counts[lab] = counts.get(lab, 0) + 1
                return {"allocation_counts": counts, "allocation_cost": m["cost"], "budget": m["limit"],
                        "predicted_kl": m["predicted_kl"], "spearman": sens["spearman"],
                        "sensitivity_cpu_s": sens["info"]["cpu_seconds"], "sensitivity_tokens": sens["info"]["tokens"],
                        "allocation_table": {"allocation": m["allocation"], "sensitivity": sens}}
    return {}


def write(out: str, meta: dict, rows: list[dict]) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# {meta['model']}: allocated vs uniform at the same budget",
             "", f"Perplexity on {meta['eval_data']} (first {meta['eval_tokens']} tokens, {meta['eval_seq_len']}-token "
             f"windows); calibration {meta['calib_samples']} x {meta['calib_seq_len']} tokens of {meta['calib']}; "
             f"{meta['threads']} threads, torch {meta['torch']}. CPU s: all threads of the process (shared, noisy "
             "2-core machine).", "",
             "| recipe | PPL | ΔPPL | bytes (quantised layers) | bits/weight | sparsity | allocation | proxy ρ | "
             "compress CPU s (sensitivity) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        alloc = ", ".join(f"{k} x{v}" for k, v in sorted(r.get("allocation_counts", {}).items())) or "-"
        rho = f"{r['spearman']['pooled']:.3f}" if r.get("spearman") else "-"
        sens = f" ({r['sensitivity_cpu_s']:.0f})" if "sensitivity_cpu_s" in r else ""
        lines.append(f"| {r['recipe']} | {r['perplexity']:.3f} | {r['delta_ppl']:+.3f} | "
                     f"{r.get('quant_bytes', '-')} | {_f(r.get('bits_per_weight'), 4)} | {_f(r.get('sparsity'), 4)} | "
                     f"{alloc} | {rho} | {_f(r.get('compress_cpu_s'), 0)}{sens} |")
    Path(out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def _f(v: float | None, nd: int) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


if __name__ == "__main__":
    sys.exit(main())
