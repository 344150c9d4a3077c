"""ΔPPL table for weight quantisation recipes on one model, all measured in one run.

Loads the model once, evaluates the float baseline, then for each recipe: copy the model,
compress (timed), evaluate on the same tokens. Writes JSON + Markdown.

    python bench/quant_table.py --recipes rtn-w8 rtn-w4-g64 gptq-w4-g64 --out bench/results/smollm2_quant
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("MODELPRESS_SHARED", HERE.parents[1] / "shared")) / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bundled:smollm2-135m-instruct")
    ap.add_argument("--recipes", nargs="+", required=True)
    ap.add_argument("--eval-data", default=str(SHARED / "wikitext2/wiki.test.raw"))
    ap.add_argument("--join-lines", action="store_true", default=True)
    ap.add_argument("--no-join-lines", dest="join_lines", action="store_false")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--eval-seq-len", type=int, default=1024)
    ap.add_argument("--calib", default=str(SHARED / "c4/c4_en_train_first1000.jsonl"))
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", action="store_true", help="also save each model (modelpress format) and record its file size")
    ap.add_argument("--out", required=True, help="output path without extension (.json and .md are written)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MODELPRESS_PROGRESS", "0")
    import modelpress as mp
    from modelpress.data.sources import read_text
    from modelpress.eval.perplexity import perplexity

    t0 = time.perf_counter()
    base_lm = mp.load(args.model)
    load_s = time.perf_counter() - t0
    ids = base_lm.tokenizer.encode(read_text(args.eval_data, args.join_lines))[: args.eval_tokens]
    bos = base_lm.tokenizer.bos_token_id if base_lm.add_bos else None
    calib = mp.calibration_for(base_lm, args.calib, args.calib_samples, args.calib_seq_len)

    from modelpress.quant.qlinear import cached_dequant

    def ppl(module: torch.nn.Module) -> float:
        with cached_dequant():
            return perplexity(module, ids, args.eval_seq_len, bos_token_id=bos).perplexity

    meta = {k: getattr(args, k) for k in ("model", "eval_data", "eval_tokens", "eval_seq_len", "calib", "calib_samples",
                                           "calib_seq_len", "threads")}
    meta.update(load_s=load_s, torch=torch.__version__, machine=os.uname().nodename, cpus=os.cpu_count())
    t = time.perf_counter()
    base = ppl(base_lm.module)
    rows = [{"recipe": "baseline (fp32)", "perplexity": base, "delta_ppl_pct": 0.0, "compress_s": 0.0,
             "eval_s": time.perf_counter() - t, "bits_per_weight": 32.0,
             **({"file_bytes": saved_bytes(base_lm)} if args.sizes else {})}]
    print(json.dumps(rows[-1]), flush=True)
    for name in args.recipes:
        lm = mp.load(copy.deepcopy(base_lm.module))
        lm.tokenizer, lm.add_bos, lm.source = base_lm.tokenizer, base_lm.add_bos, base_lm.source
        t = time.perf_counter()
        rep = mp.compress(lm, name, calib=calib, progress=False)
        cs = time.perf_counter() - t
        t = time.perf_counter()
        p = ppl(lm.module)
        rows.append({"recipe": name, "perplexity": p, "delta_ppl_pct": 100 * (p - base) / base, "compress_s": cs,
                     "eval_s": time.perf_counter() - t, "bits_per_weight": rep["mean_bits_per_weight"],
                     "warnings": rep["warnings"][:3], **({"file_bytes": saved_bytes(lm)} if args.sizes else {})})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "warnings"}), flush=True)
        write(args.out, meta, rows)  # after every row: a stopped run keeps what it measured
    write(args.out, meta, rows)


def saved_bytes(lm) -> int:
    """Bytes of the weight files that ``modelpress.save`` writes for ``lm``."""
    import tempfile

    from modelpress.eval.size import disk_bytes
    from modelpress.export.saving import save_compressed

    with tempfile.TemporaryDirectory() as d:
        return disk_bytes(save_compressed(lm, Path(d) / "m"))


def write(out: str, meta: dict, rows: list[dict]) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# {meta['model']}: perplexity on {Path(meta['eval_data']).name}",
             "", f"first {meta['eval_tokens']} tokens, {meta['eval_seq_len']}-token windows; calibration "
             f"{meta['calib_samples']} x {meta['calib_seq_len']} tokens from {Path(meta['calib']).name}; "
             f"{meta['threads']} threads, torch {meta['torch']}", "",
             "| recipe | bits/weight | PPL | ΔPPL | compress s |" + (" file MB |" if "file_bytes" in rows[0] else ""),
             "|---|---|---|---|---|" + ("---|" if "file_bytes" in rows[0] else "")]
    for r in rows:
        bits = f"{r['bits_per_weight']:.3f}" if r.get("bits_per_weight") is not None else "-"
        size = f" {r['file_bytes'] / 1e6:.1f} |" if "file_bytes" in r else ""
        lines.append(f"| {r['recipe']} | {bits} | {r['perplexity']:.3f} | "
                     f"{r['delta_ppl_pct']:+.2f}% | {r['compress_s']:.1f} |{size}")
    Path(out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
