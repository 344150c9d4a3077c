"""Recovery fine-tuning after compression on one model: each built-in compression recipe alone, then the
same recipe followed by a ``recover`` stage, perplexity before and after, with the training tokens and
the CPU seconds the recovery cost.

For each recipe two runs start from the same float copy: the recipe alone (the "before" row), and the
recipe with ``{method: recover, train: ...}`` appended (the "after" row: the Runner snapshots the float
model as teacher, exactly as ``modelpress compress`` does). Recovery is KD from the float model
(temperature 2, half hard labels: the stage's ``auto`` losses) on C4 text that is not the calibration
sample. Masks, grids and pruned shapes are kept (checked: the sparsity and the bits per weight of the
after row equal the before row's).

Training a 135M model on 2 CPU cores costs ~10-15 CPU s per 2,048-token step, so the default budget is
small (40 steps of 8 x 256 tokens, 81,920 tokens); ``--steps`` raises it.

    python bench/recover_table.py --threads 1 --out bench/results/recover_table
    # two processes side by side on 2 cores, merged afterwards:
    python bench/recover_table.py --rows structured-25 --out /tmp/a &
    python bench/recover_table.py --rows sparsegpt-50 gptq-w3-g64 --out /tmp/b; wait
    python bench/recover_table.py --merge /tmp/a.json /tmp/b.json --out bench/results/recover_table
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

ROWS = ("structured-25", "sparsegpt-50", "gptq-w3-g64")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bundled:smollm2-135m-instruct")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), help="built-in recipes to recover from")
    ap.add_argument("--eval-data", default="/work/shared/data/wikitext2/wiki.test.raw")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--eval-seq-len", type=int, default=1024)
    ap.add_argument("--calib", default="bundled:c4")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--train-samples", type=int, default=512, help="recovery training sequences (C4, seed 1)")
    ap.add_argument("--train-seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--activation-checkpointing", action="store_true",
                    help="recompute each block's activations in the backward pass (train.activation_checkpointing)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--merge", nargs="+", help="merge these result files (written by runs of --rows) into --out")
    ap.add_argument("--out", required=True, help="output path without extension (.json and .md are written)")
    args = ap.parse_args()
    if args.merge:
        parts = [json.loads(Path(p).read_text()) for p in args.merge]
        rows = [r for p in parts for r in p["rows"]]
        threads = {str(p["meta"]["threads"]) for p in parts}  # the parts may have run at different thread counts
        meta = {**parts[0]["meta"], "merged_from": args.merge, "rows_run": [r["recipe"] for r in rows],
                "threads": parts[0]["meta"]["threads"] if len(threads) == 1 else
                " / ".join(f"{p['meta']['threads']} ({', '.join(r['recipe'] for r in p['rows'])})" for p in parts)}
        write(args.out, meta, rows)
        return
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MODELPRESS_PROGRESS", "0")
    import modelpress as mp
    from modelpress.api import training_for
    from modelpress.pipeline.recipe import load_recipe

    base_lm, calib, ppl, fresh = float_model_and_eval(args)
    train = training_for(base_lm, args.calib, args.train_samples, args.train_seq_len, seed=1)

    recover = {"method": "recover", "train": {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                                              "activation_checkpointing": args.activation_checkpointing}}
    meta = {**{k: getattr(args, k) for k in ("model", "eval_data", "eval_tokens", "eval_seq_len", "calib",
                                              "calib_samples", "calib_seq_len", "train_samples", "train_seq_len",
                                              "threads")},
            "recover_stage": recover, "torch": torch.__version__, "machine": os.uname().nodename,
            "cpus": os.cpu_count()}
    base = ppl(base_lm.module)
    rows: list[dict] = []
    for name in args.rows:
        stages = [s.to_dict() for s in load_recipe(name).stages]
        lm = fresh()
        rep = mp.compress(lm, {"name": name, "stages": stages}, calib=calib, progress=False)
        before, shape = ppl(lm.module), _shape(lm.module)
        del lm
        lm, load0 = fresh(), os.getloadavg()[0]
        rep2 = mp.compress(lm, {"name": f"{name} + recover", "stages": stages + [recover]}, calib=calib,
                           train=train.input_ids, progress=False)
        after = ppl(lm.module)
        assert _shape(lm.module) == shape, f"{name}: recovery changed what compression decided"
        tr = next(m for s in rep2["stages"] for m in s["metrics"] if m.get("stage") == "recover")
        rows.append({"recipe": name, "fp32_ppl": base, "before_ppl": before, "after_ppl": after,
                     "before_delta_pct": 100 * (before - base) / base, "after_delta_pct": 100 * (after - base) / base,
                     "bits_per_weight": rep.get("mean_bits_per_weight"), "zeros_and_params": shape,
                     "compress_cpu_s": rep["compress_cpu_s"], "recover_steps": tr["steps"],
                     "recover_tokens": tr["tokens"], "recover_cpu_s": tr["cpu_s"],
                     "recover_wall_s": tr["wall_s"], "loss_first_last": [tr["losses"][0][1], tr["losses"][-1][1]]
                     if tr.get("losses") else None, "peak_rss_gib": rep2.get("peak_rss_bytes", 0) / 2**30,
                     "load_avg_1min": [load0, os.getloadavg()[0]]})
        print(json.dumps(rows[-1]), flush=True)
        write(args.out, meta, rows)  # after every row: a stopped run keeps what it measured


def _shape(module: torch.nn.Module) -> list[int]:
    """What recovery must keep: (pruned-away weights of the sparse layers, weights of every linear layer as
    stored, quantised layers). Mask zeros of a sparse layer stay zero; shapes and the layer kinds stay."""
    zeros = total = quantised = 0
    with torch.no_grad():
        for m in module.modules():
            if hasattr(m, "effective_weight"):  # a pruned layer: weight * mask
                w = m.effective_weight()
                zeros, total = zeros + int((w == 0).sum()), total + w.numel()
            elif hasattr(m, "dequantized_weight"):
                quantised, total = quantised + 1, total + m.out_features * m.in_features
            elif isinstance(m, torch.nn.Linear):
                total += m.weight.numel()
    return [zeros, total, quantised]


def write(out: str, meta: dict, rows: list[dict]) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    rec = meta["recover_stage"]["train"]
    lines = [f"# {meta['model']}: compression, then `recover` (KD from the float model), perplexity on "
             f"{Path(meta['eval_data']).name}", "",
             f"first {meta['eval_tokens']} tokens, {meta['eval_seq_len']}-token windows; calibration "
             f"{meta['calib_samples']} x {meta['calib_seq_len']} tokens from {meta['calib']}; recovery "
             f"{rec['steps']} steps x {rec['batch_size']} x {meta['train_seq_len']} tokens of {meta['calib']} "
             f"(another sample), lr {rec['lr']}, cosine{', activation checkpointing' if rec.get('activation_checkpointing') else ''}; "
             f"{meta['threads']} thread(s) per process, "
             f"torch {meta['torch']}, {meta['cpus']} CPUs", "",
             "| recipe | bits/weight | PPL fp32 | PPL before | ΔPPL before | PPL after recover | ΔPPL after | "
             "share of ΔPPL recovered | recover tokens | recover CPU s | peak RSS GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gain = 1 - (r["after_ppl"] - r["fp32_ppl"]) / (r["before_ppl"] - r["fp32_ppl"])
        bits = "32 (smaller matrices)" if r["bits_per_weight"] is None else f"{r['bits_per_weight']:.3f}"
        lines.append(f"| {r['recipe']} | {bits} | {r['fp32_ppl']:.2f} | {r['before_ppl']:.2f} | "
                     f"{r['before_delta_pct']:+.1f}% | {r['after_ppl']:.2f} | {r['after_delta_pct']:+.1f}% | "
                     f"{100 * gain:.0f}% | {r['recover_tokens']:,} | {r['recover_cpu_s']:.0f} | {r['peak_rss_gib']:.2f} |")
    Path(out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
