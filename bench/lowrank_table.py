"""Low-rank compression on one model, one run: plain SVD vs ASVD vs SVD-LLM vs FWSVD at the same
parameter budget, and GPTQ W3 g64 with and without rank-32 compensation (EoRA). PPL, ΔPPL, weights kept in
the decoder blocks, bits per weight (quantised rows), compress wall and CPU seconds.

Loads the model once, evaluates the float baseline, then for each recipe: copy the model, compress
(wall and CPU seconds of the compression alone, from the run report), evaluate on the same tokens.
``--ratios`` adds rows of each factorising method at other kept fractions (e.g. 0.9 0.7). With
``--threads 1`` the CPU seconds are what the job itself cost; wall seconds follow the machine's
load (1-minute load average before and after each row recorded). Writes JSON + Markdown.

    python bench/lowrank_table.py --threads 1 --out bench/results/smollm2_lowrank
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

RECIPES = ["svd-r20", "asvd-r20", "svdllm-r20", "fwsvd-r20", "gptq-w3-g64", "gptq-w3-g64-lr32"]
FACTORISING = ("svd", "asvd", "svdllm", "fwsvd")
_W3G64 = {"type": "int", "bits": 3, "symmetric": True, "granularity": 64}
#: Recipes of this table only (usable in --recipes by name): compensation after the data-free quantiser,
#: which costs one calibration pass instead of GPTQ's.
LOCAL = {"rtn-w3-g64-lr32": {"name": "rtn-w3-g64-lr32", "stages": [
    {"method": "rtn", "ignore": ["lm_head"], "format": _W3G64}, {"method": "eora", "ignore": ["lm_head"], "rank": 32}]}}


def block_weights(module: torch.nn.Module) -> int:
    """Weights of the linears inside the decoder blocks: a dense or quantised linear counts out * in,
    a low-rank layer its factors, a compensated one its quantised weight plus its factors."""
    from modelpress.lowrank.layer import CompensatedLinear, LowRankLinear
    from modelpress.models.archspec import blocks_path, detect_spec
    from modelpress.models.layers import is_linear_like, linear_shape

    blocks = module.get_submodule(blocks_path(module, detect_spec(module)))
    total, counted = 0, []
    for name, m in blocks.named_modules():
        if any(name.startswith(c + ".") for c in counted):
            continue  # a factor of a layer counted already
        if isinstance(m, LowRankLinear):
            total += m.params_kept()
        elif isinstance(m, CompensatedLinear):
            total += m.in_features * m.out_features + m.rank * (m.in_features + m.out_features)
        elif is_linear_like(m):
            out_f, in_f = linear_shape(m)
            total += out_f * in_f
        else:
            continue
        counted.append(name)
    return total


def bits_per_weight(report: dict) -> float | None:
    """Weight-averaged bits of each layer's last report row (a compensated layer: base + factors)."""
    last = {r["name"]: r for r in report["layers"] if r.get("bits_per_weight") is not None}
    n = sum(r["shape"][0] * r["shape"][1] for r in last.values())
    return sum(r["bits_per_weight"] * r["shape"][0] * r["shape"][1] for r in last.values()) / n if n else None


def recipe_list(names: list[str], ratios: list[float]) -> list[tuple[str, object]]:
    """(label, recipe) rows: the named recipes, then each factorising method at every extra ratio."""
    rows: list[tuple[str, object]] = [(n, LOCAL.get(n, n)) for n in names]
    for r in ratios:
        for m in FACTORISING:
            rows.append((f"{m}-keep{r:g}", {"name": f"{m}-keep{r:g}", "stages": [
                {"method": m, "ignore": ["lm_head"], "param_ratio": r}]}))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bundled:smollm2-135m-instruct")
    ap.add_argument("--recipes", nargs="+", default=RECIPES, help="built-in names or recipe files")
    ap.add_argument("--ratios", nargs="*", type=float, default=[], help="extra kept fractions, each factorising method")
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
    base, dense = ppl(base_lm.module), block_weights(base_lm.module)
    rows = [{"recipe": "baseline (fp32)", "perplexity": base, "delta_ppl_pct": 0.0, "bits_per_weight": 32.0,
             "block_weights_kept": 1.0}]
    for label, recipe in recipe_list(args.recipes, args.ratios):
        lm = fresh()
        load_before = os.getloadavg()[0]
        rep = mp.compress(lm, recipe, calib=calib, progress=False)
        load_after = os.getloadavg()[0]
        p = ppl(lm.module)
        rows.append({"recipe": label, "perplexity": p, "delta_ppl_pct": 100 * (p - base) / base,
                     "bits_per_weight": bits_per_weight(rep), "block_weights_kept": block_weights(lm.module) / dense,
                     "params": rep["params"], "compress_s": rep["compress_s"], "compress_cpu_s": rep["compress_cpu_s"],
                     "load_avg_1min": [load_before, load_after], "warnings": rep["warnings"][:5]})
        print(json.dumps(rows[-1]), flush=True)
        write(args.out, meta, rows)  # after every row: a stopped run keeps what it measured


def write(out: str, meta: dict, rows: list[dict]) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# {meta['model']}: low-rank compression, perplexity on {meta['eval_data']}", "",
             f"first {meta['eval_tokens']} tokens, {meta['eval_seq_len']}-token windows; calibration (ASVD, SVD-LLM, "
             f"FWSVD's gradients, GPTQ, EoRA) "
             f"{meta['calib_samples']} x {meta['calib_seq_len']} tokens from {meta['calib']}; "
             f"{meta['threads']} thread(s), torch {meta['torch']}, {meta['cpus']} CPUs. `weights kept`: linear "
             "weights inside the decoder blocks after / before (lm_head and embeddings untouched); `bits/weight`: "
             "the compressed linears' storage per original weight (fp32 factors count 32 bits each).", "",
             "| recipe | weights kept | bits/weight | PPL | ΔPPL | PPL / fp32 | compress wall s | compress CPU s "
             "| load avg (before, after) |", "|---|---|---|---|---|---|---|---|---|"]
    base = rows[0]["perplexity"]
    for r in rows:
        t = (f"{r['compress_s']:.1f} | {r['compress_cpu_s']:.1f} | {r['load_avg_1min'][0]:.1f}, "
             f"{r['load_avg_1min'][1]:.1f}") if "compress_s" in r else "- | - | -"
        bits = f"{r['bits_per_weight']:.3f}" if r.get("bits_per_weight") is not None else "-"
        lines.append(f"| {r['recipe']} | {r['block_weights_kept']:.4f} | {bits} | {r['perplexity']:.3f} | "
                     f"{r['delta_ppl_pct']:+.2f}% | {r['perplexity'] / base:.3f} | {t} |")
    Path(out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
