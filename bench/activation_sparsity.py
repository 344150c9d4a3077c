"""Activation sparsity on one model: dense vs TEAL thresholds vs Deja Vu predictors, all in one run.

Same protocol as ``quant_table.py`` (WikiText-2 test, first N tokens, non-overlapping windows;
calibration N x L tokens of C4). For each variant: copy the model, calibrate through the recipe
engine (timed), evaluate perplexity on the same tokens while counting the MLP multiply-adds that
the zeroed inputs / unselected neurons made unnecessary (measured on the eval tokens).

    python bench/activation_sparsity.py --threads 2 --out bench/results/smollm2_activation_sparsity
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("MODELPRESS_SHARED", HERE.parents[1] / "shared")) / "data"
ROLES_MLP = ["role:gate_proj", "role:up_proj", "role:down_proj"]


def variants(args: argparse.Namespace) -> list[tuple[str, dict]]:
    """(label, recipe stage) for every variant measured after the dense baseline."""
    teal = [(f"teal-{round(100 * s)} (all linears)", {"method": "teal", "sparsity": s}) for s in args.teal]
    teal_mlp = [(f"teal-{round(100 * s)} (MLP only)", {"method": "teal", "sparsity": s, "targets": ROLES_MLP})
                for s in args.teal_mlp]
    dejavu = [(f"dejavu-{round(100 * s)} (rank {args.rank})",
               {"method": "dejavu", "sparsity": s, "rank": args.rank, "max_calib_tokens": args.dejavu_tokens})
              for s in args.dejavu]
    return teal[:1] + dejavu[:1] + teal[1:] + teal_mlp + dejavu[1:]  # the headline rows first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bundled:smollm2-135m-instruct")
    ap.add_argument("--eval-data", default=str(SHARED / "wikitext2/wiki.test.raw"))
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--eval-seq-len", type=int, default=1024)
    ap.add_argument("--calib", default=str(SHARED / "c4/c4_en_train_first1000.jsonl"))
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--teal", type=float, nargs="*", default=[0.4, 0.25, 0.5])
    ap.add_argument("--teal-mlp", type=float, nargs="*", default=[0.4])
    ap.add_argument("--dejavu", type=float, nargs="*", default=[0.5])
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--dejavu-tokens", type=int, default=8192, help="calibration tokens each predictor trains on")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True, help="output path without extension (.json and .md are written)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MODELPRESS_PROGRESS", "0")
    import modelpress as mp
    from modelpress.data.sources import read_text
    from modelpress.eval.perplexity import perplexity
    from modelpress.sparsity.activation import OracleTopK, measure_mlp

    base_lm = mp.load(args.model)
    ids = base_lm.tokenizer.encode(read_text(args.eval_data, True))[: args.eval_tokens]
    bos = base_lm.tokenizer.bos_token_id if base_lm.add_bos else None
    calib = mp.calibration_for(base_lm, args.calib, args.calib_samples, args.calib_seq_len)

    def evaluate(lm) -> dict:
        t = time.perf_counter()
        with measure_mlp(lm) as r:
            p = perplexity(lm.module, ids, args.eval_seq_len, bos_token_id=bos).perplexity
        return {"perplexity": p, "eval_s": time.perf_counter() - t, **r.to_dict()}

    meta = {k: getattr(args, k) for k in ("model", "eval_data", "eval_tokens", "eval_seq_len", "calib",
                                           "calib_samples", "calib_seq_len", "threads", "rank", "dejavu_tokens")}
    meta.update(torch=torch.__version__, cpus=os.cpu_count())
    rows = [{"variant": "dense (fp32)", "calib_s": 0.0, **evaluate(base_lm)}]
    base = rows[0]["perplexity"]
    _log(rows[-1])
    for label, stage in variants(args):
        lm = mp.load(copy.deepcopy(base_lm.module))
        lm.tokenizer, lm.add_bos, lm.source = base_lm.tokenizer, base_lm.add_bos, base_lm.source
        t = time.perf_counter()
        rep = mp.compress(lm, {"name": label, "stages": [stage]}, calib=calib, progress=False)
        row = {"variant": label, "stage": stage, "calib_s": time.perf_counter() - t, **evaluate(lm),
               "warnings": rep["warnings"][:3]}
        recalls = [float(m.group(1)) for r in rep["layers"] for n in r["notes"] if (m := re.match(r"held-out recall=(.*)", n))]
        if recalls:
            row["predictor_recall_mean"], row["predictor_recall_min"] = sum(recalls) / len(recalls), min(recalls)
        rows.append(row)
        _log(row)
        if stage["method"] == "dejavu":  # same k, true top-k neurons: the best any predictor could do
            for m in lm.module.modules():
                if hasattr(m, "selector"):
                    m.selector = OracleTopK()
            rows.append({"variant": label.replace("dejavu", "oracle top-k"), "calib_s": 0.0, **evaluate(lm)})
            _log(rows[-1])
        for r in rows:
            r["delta_ppl_pct"] = 100 * (r["perplexity"] - base) / base
        write(args.out, meta, rows)
    write(args.out, meta, rows)


def _log(row: dict) -> None:
    print(json.dumps({k: v for k, v in row.items() if k not in ("warnings", "stage")}), flush=True)


def write(out: str, meta: dict, rows: list[dict]) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# {meta['model']}: activation sparsity, perplexity on {Path(meta['eval_data']).name}", "",
             f"first {meta['eval_tokens']} tokens, {meta['eval_seq_len']}-token windows; calibration "
             f"{meta['calib_samples']} x {meta['calib_seq_len']} tokens from {Path(meta['calib']).name}; "
             f"{meta['threads']} threads, torch {meta['torch']}. Skipped MLP MACs are counted on the eval tokens: "
             "a weight column whose input is zero (TEAL) or a neuron not selected (Deja Vu: its gate/up rows and "
             "down column) is work a sparse kernel need not do; 'net' charges the predictor's own MACs.", "",
             "| variant | PPL | ΔPPL | skipped MLP MACs | net | input sparsity (gate/up, down) | predictor recall | calib s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sp = r.get("input_sparsity") or {}
        sp_s = f"{sp['gate_proj']:.3f}, {sp['down_proj']:.3f}" if "gate_proj" in sp and "down_proj" in sp else ""
        rec = f"{r['predictor_recall_mean']:.3f} (min {r['predictor_recall_min']:.3f})" if "predictor_recall_mean" in r else ""
        lines.append(f"| {r['variant']} | {r['perplexity']:.3f} | {r.get('delta_ppl_pct', 0.0):+.2f}% | "
                     f"{100 * r['skipped_fraction']:.1f}% | {100 * r['net_fraction']:.1f}% | {sp_s} | {rec} | {r['calib_s']:.0f} |")
    Path(out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
