"""HQQ beside RTN and GPTQ on one model: ΔPPL, bits/weight, compress wall and CPU seconds, one run.

Loads the model once, evaluates the float baseline, then for each recipe: copy the model, compress
(wall and CPU seconds of the compression alone, from the run report), evaluate on the same tokens.
CPU time is reported beside wall time because the machine may be shared: with ``--threads 1`` the
CPU seconds are what the job itself cost, the wall seconds what it took under the load at the time
(the 1-minute load average before and after each row is recorded too). Writes JSON + Markdown.

    python bench/hqq_table.py --threads 1 --out bench/results/smollm2_hqq
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _compress_setup import float_model_and_eval  # noqa: E402

RECIPES = ["rtn-w4-g64", "gptq-w4-g64", "hqq-w4-g64", "rtn-w3-g64", "gptq-w3-g64", "hqq-w3-g64"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bundled:smollm2-135m-instruct")
    ap.add_argument("--recipes", nargs="+", default=RECIPES, help="built-in names or recipe files")
    ap.add_argument("--eval-data", default="bundled:wikitext2")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--eval-seq-len", type=int, default=1024)
    ap.add_argument("--calib", default="bundled:c4")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True, help="output path without extension (.json and .md are written)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MODELPRESS_PROGRESS", "0")
    import modelpress as mp

    base_lm, calib, ppl, fresh = float_model_and_eval(args)

    meta = {**{k: getattr(args, k) for k in ("model", "eval_data", "eval_tokens", "eval_seq_len", "calib",
                                              "calib_samples", "calib_seq_len", "threads")},
            "torch": torch.__version__, "machine": os.uname().nodename, "cpus": os.cpu_count()}
    base = ppl(base_lm.module)
    rows = [{"recipe": "baseline (fp32)", "perplexity": base, "delta_ppl_pct": 0.0, "bits_per_weight": 32.0}]
    for name in args.recipes:
        lm = fresh()
        load_before = os.getloadavg()[0]
        rep = mp.compress(lm, name, calib=calib, progress=False)
        load_after = os.getloadavg()[0]
        p = ppl(lm.module)
        rows.append({"recipe": name, "perplexity": p, "delta_ppl_pct": 100 * (p - base) / base,
                     "bits_per_weight": rep["mean_bits_per_weight"], "compress_s": rep["compress_s"],
                     "compress_cpu_s": rep["compress_cpu_s"], "load_avg_1min": [load_before, load_after]})
        print(json.dumps(rows[-1]), flush=True)
        write(args.out, meta, rows)  # after every row: a stopped run keeps what it measured


def write(out: str, meta: dict, rows: list[dict]) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# {meta['model']}: perplexity on {meta['eval_data']}", "",
             f"first {meta['eval_tokens']} tokens, {meta['eval_seq_len']}-token windows; calibration (GPTQ) "
             f"{meta['calib_samples']} x {meta['calib_seq_len']} tokens from {meta['calib']}; {meta['threads']} "
             f"thread(s), torch {meta['torch']}, {meta['cpus']} CPUs", "",
             "| recipe | bits/weight | PPL | ΔPPL | compress wall s | compress CPU s | load avg (before, after) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        t = (f"{r['compress_s']:.1f} | {r['compress_cpu_s']:.1f} | {r['load_avg_1min'][0]:.1f}, "
             f"{r['load_avg_1min'][1]:.1f}") if "compress_s" in r else "- | - | -"
        lines.append(f"| {r['recipe']} | {r['bits_per_weight']:.3f} | {r['perplexity']:.3f} | "
                     f"{r['delta_ppl_pct']:+.2f}% | {t} |")
    Path(out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
