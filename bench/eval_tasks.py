"""Task accuracy, flips, KL and slices: SmolLM2-135M fp32 vs a compressed copy (default gptq-w3-g64), one run.

Converts HellaSwag (llama.cpp's 6-line text of the validation set) and a few BLiMP paradigms from
``../shared/data`` to modelpress's JSONL task format, compresses the model once with
``modelpress.compress``, then runs ``modelpress.eval.suite.evaluate_beyond_ppl`` with the fp32 model
as the baseline: acc / acc_norm of both, flip rate, per-slice tables (HellaSwag: activity label,
length, rare-token rate; BLiMP: paradigm), next-token KL and top-1 agreement on WikiText-2, and the
wall and CPU seconds of every part. Writes JSON + Markdown.

Protocol (as lm-evaluation-harness, zero-shot): HellaSwag context "activity_label: ctx", endings
scored as " " + ending, acc_norm by ending length; BLiMP as the harness's ``blimp_*`` tasks (empty
context, so the prefix token, then " " + sentence; good vs bad sentence). One difference from the
harness's HellaSwag: llama.cpp's file keeps ctx_b in lower case (the harness capitalises it).

    nice -n 19 python bench/eval_tasks.py --threads 1 --out bench/results/eval_tasks
"""
from __future__ import annotations

import argparse
import bz2
import collections
import copy
import json
import os
import re
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

SHARED = Path(os.environ.get("MODELPRESS_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "data"
PARADIGMS = ["anaphor_gender_agreement", "determiner_noun_agreement_2", "wh_questions_object_gap",
             "irregular_past_participle_adjectives", "existential_there_quantifiers_1"]


def _harness_preprocess(text: str) -> str:
    """lm-evaluation-harness's HellaSwag ``preprocess``: [title] -> '. ', other [tags] dropped, double spaces."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def convert_hellaswag(src: Path, n: int, out: Path, top_labels: int = 6) -> Path:
    """First ``n`` HellaSwag validation items -> JSONL; slice = activity label (the ``top_labels``
    commonest among them, the rest 'other')."""
    lines = bz2.open(src, "rt", encoding="utf-8").read().splitlines()
    items = []
    for k in range(0, min(6 * n, len(lines) - 5), 6):
        ctx, gold, endings = lines[k], int(lines[k + 1]), lines[k + 2:k + 6]
        items.append({"context": _harness_preprocess(ctx), "choices": [_harness_preprocess(e) for e in endings],
                      "label": gold, "activity": ctx.split(":", 1)[0]})
    common = {a for a, _ in collections.Counter(i["activity"] for i in items).most_common(top_labels)}
    with out.open("w") as f:
        for it in items:
            act = it.pop("activity")
            f.write(json.dumps({**it, "slice": act if act in common else "other"}) + "\n")
    return out


def convert_blimp(src: Path, paradigms: list[str], n: int, out: Path) -> Path:
    """First ``n`` pairs of each paradigm -> one JSONL task, slice = paradigm (harness: empty context)."""
    with zipfile.ZipFile(src) as z, out.open("w") as f:
        for p in paradigms:
            rows = [json.loads(x) for x in z.read(f"data/{p}.jsonl").decode().splitlines() if x.strip()][:n]
            for r in rows:
                f.write(json.dumps({"context": "", "choices": [r["sentence_good"], r["sentence_bad"]], "label": 0,
                                    "slice": p}) + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bundled:smollm2-135m-instruct")
    ap.add_argument("--recipe", default="gptq-w3-g64")
    ap.add_argument("--hellaswag-items", type=int, default=300)
    ap.add_argument("--blimp-paradigms", nargs="+", default=PARADIGMS[:3])
    ap.add_argument("--blimp-items", type=int, default=200)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--agreement-tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch-tokens", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results/eval_tasks", help="output path without extension")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MODELPRESS_PROGRESS", "0")
    import modelpress as mp
    from modelpress.eval.suite import EvalPlan, evaluate_beyond_ppl, markdown_lines

    tmp = Path(tempfile.mkdtemp(prefix="mp-eval-tasks-"))
    tasks = [convert_hellaswag(SHARED / "hellaswag/hellaswag_val_full.txt.bz2", args.hellaswag_items, tmp / "hellaswag.jsonl"),
             convert_blimp(SHARED / "blimp/BLiMP.zip", args.blimp_paradigms, args.blimp_items, tmp / "blimp.jsonl")]
    base = mp.load(args.model)
    lm = mp.load(copy.deepcopy(base.module))
    lm.tokenizer, lm.add_bos, lm.source = base.tokenizer, base.add_bos, f"{base.source} + {args.recipe}"
    calib = mp.calibration_for(base, "bundled:c4", args.calib_samples, args.calib_seq_len)
    load0 = os.getloadavg()[0]
    rep = mp.compress(lm, args.recipe, calib=calib, progress=False)
    plan = EvalPlan(tasks=tuple(map(str, tasks)), agreement_text="bundled:wikitext2", agreement_tokens=args.agreement_tokens,
                    seq_len=args.seq_len, token_budget=args.batch_tokens)
    t0, c0 = time.perf_counter(), time.process_time()
    res = evaluate_beyond_ppl(lm, plan, base)
    res["eval_wall_s"], res["eval_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
    meta = {**vars(args), "torch": torch.__version__, "cpus": os.cpu_count(), "load_avg_1min": [load0, os.getloadavg()[0]],
            "compress_s": rep["compress_s"], "compress_cpu_s": rep.get("compress_cpu_s"),
            "bits_per_weight": rep["mean_bits_per_weight"]}
    write(args.out, meta, res, markdown_lines(res))


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "-"


def write(out: str, meta: dict, res: dict, detail: list[str]) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".json").write_text(json.dumps({"meta": meta, "results": res}, indent=1))
    lines = [f"# Task accuracy and agreement: {meta['model']} fp32 vs {meta['recipe']}", "",
             f"{meta['threads']} thread(s), torch {meta['torch']}, {meta['cpus']} CPUs (shared machine, 1-min load "
             f"{meta['load_avg_1min'][0]:.1f} -> {meta['load_avg_1min'][1]:.1f}: compare CPU seconds, not wall). "
             f"{meta['recipe']}: {meta['bits_per_weight']:.3f} bits/weight, compressed in {meta['compress_s']:.0f} s wall "
             f"/ {meta['compress_cpu_s'] or 0:.0f} s CPU. Evaluation of both models: {res['eval_wall_s']:.0f} s wall, "
             f"{res['eval_cpu_s']:.0f} s CPU.", "",
             "| task | n | metric | fp32 | compressed | ratio | flip rate | right->wrong | wrong->right | CPU s fp32 / compressed |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, t in res["tasks"].items():
        for m, fl in (("acc", t["flips"]), ("acc_norm", t["flips_norm"])):
            lines.append(f"| {name} | {t['n']} | {m} | {t['baseline'][m]:.4f} | {t[m]:.4f} | {_ratio(t[m], t['baseline'][m])} | "
                         f"{fl['flip_rate']:.4f} | {fl['correct_to_wrong']} | {fl['wrong_to_correct']} | "
                         f"{t['baseline']['cpu_s']:.0f} / {t['cpu_s']:.0f} |")
    a = res["agreement"]
    lines += ["", f"Next-token KL(fp32 || compressed) = {a['kl']:.4f} nats/position, top-1 agreement "
              f"{a['top1_agreement']:.4f}, over {a['positions']} positions of {a['text']} ({a['seq_len']}-token windows).", ""]
    lines += _slice_lines(res["tasks"]) + detail
    Path(out + ".md").write_text("\n".join(lines) + "\n")


def _slice_lines(tasks: dict) -> list[str]:
    out = ["## Slices (acc_norm)", "", "| task | slicing | slice | n | fp32 | compressed | delta | gap vs overall | flagged |",
           "|---|---|---|---|---|---|---|---|---|"]
    for name, t in tasks.items():
        for fam, per_metric in t["slices"].items():
            table = per_metric["acc_norm"]
            for s, r in table["slices"].items():
                out.append(f"| {name} | {fam} | {s} | {r['n']} | {r['baseline']:.3f} | {r['value']:.3f} | {r['delta']:+.3f} | "
                           f"{r['gap_vs_overall']:+.3f} | {'**yes**' if r['flagged'] else ''} |")
    return out + [""]


if __name__ == "__main__":
    sys.exit(main())
