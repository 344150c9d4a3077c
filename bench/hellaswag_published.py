"""Our fp32 HellaSwag accuracy for SmolLM2-135M-Instruct beside the figure published for the model.

Published: the model card of HuggingFaceTB/SmolLM2-135M-Instruct reports HellaSwag **40.9**
(zero-shot, lighteval; the card names neither the normalisation nor the item count, and lighteval's
HellaSwag uses the whole validation split, 10,042 items). For the base model, SmolLM2-135M, the card
reports 42.1.

Ours: the user-facing path, ``modelpress eval --model bundled:smollm2-135m-instruct --task FILE``,
protocol as lm-evaluation-harness's ``hellaswag`` (zero-shot, context ``activity_label: ctx``
preprocessed as the harness does, endings scored as ``" " + ending``, ``acc`` by summed
log-probability, ``acc_norm`` by log-probability per byte of the ending). The items are a systematic
sample of the validation split (every ``--stride``-th item, so all of it is covered, not only its first
activity labels); the 95% interval is the Wilson score interval for that many items.

Two differences from the published run are known and stated in the table:
- the bundled weights are the Q4_1 GGUF dequantised to fp32 (a 4-bit group-32 grid), not the bf16
  original the card was measured on;
- llama.cpp's HellaSwag file keeps ``ctx_b`` in lower case (the harness capitalises it).

    python bench/hellaswag_published.py --threads 1 --stride 5 --out bench/results/hellaswag_published
"""
from __future__ import annotations

import argparse
import bz2
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_tasks import SHARED, _harness_preprocess  # noqa: E402  (the bench's shared HellaSwag conversion)

#: Figures published on the model cards (zero-shot, lighteval), in percent.
PUBLISHED = {"SmolLM2-135M-Instruct (card)": 40.9, "SmolLM2-135M base (card)": 42.1}


def sample_items(src: Path, stride: int, out: Path) -> int:
    """Every ``stride``-th validation item -> JSONL task file; returns the number of items."""
    lines = bz2.open(src, "rt", encoding="utf-8").read().splitlines()
    n = 0
    with out.open("w") as f:
        for k in range(0, len(lines) - 5, 6 * stride):
            ctx, gold, endings = lines[k], int(lines[k + 1]), lines[k + 2:k + 6]
            f.write(json.dumps({"context": _harness_preprocess(ctx), "choices": [_harness_preprocess(e) for e in endings],
                                "label": gold}) + "\n")
            n += 1
    return n


def wilson(p: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``p`` measured on ``n`` items."""
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return c - h, c + h


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bundled:smollm2-135m-instruct")
    ap.add_argument("--stride", type=int, default=5, help="every N-th validation item (1: all 10,042)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results/hellaswag_published", help="output path without extension")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mp-hellaswag-"))
    task = tmp / "hellaswag.jsonl"
    n = sample_items(SHARED / "hellaswag/hellaswag_val_full.txt.bz2", args.stride, task)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "MODELPRESS_PROGRESS": "0"}
    cmd = ["modelpress", "eval", "--model", args.model, "--task", str(task), "--json", str(tmp / "eval.json")]
    t0, r0 = time.perf_counter(), os.times()
    subprocess.run(cmd, check=True, env=env)
    r1 = os.times()
    wall, cpu = time.perf_counter() - t0, (r1.children_user - r0.children_user) + (r1.children_system - r0.children_system)
    res = json.loads((tmp / "eval.json").read_text())["tasks"]["hellaswag"]
    rows = {}
    for metric in ("acc", "acc_norm"):
        p = float(res[metric])
        lo, hi = wilson(p, n)
        rows[metric] = {"value": p, "ci95": [lo, hi]}
    meta = {"model": args.model, "items": n, "stride": args.stride, "threads": args.threads, "wall_s": wall, "cpu_s": cpu,
            "command": " ".join(cmd[:4] + ["<sample>.jsonl"]), "published_percent": PUBLISHED,
            "load_avg_1min_after": os.getloadavg()[0]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "ours": rows}, indent=2))
    lines = [f"# HellaSwag: ours vs published, {args.model}", "",
             f"{n} validation items (every {args.stride}th of 10,042), zero-shot, `{meta['command']}`; "
             f"{args.threads} thread(s), {wall:.0f} s wall, {cpu:.0f} s CPU.", "",
             "| source | protocol | weights | items | acc | acc_norm (95% CI) |", "|---|---|---|---|---|---|"]
    a, an = rows["acc"], rows["acc_norm"]
    lines.append(f"| modelpress eval (this run) | lm-eval-harness hellaswag: `activity: ctx`, ' ' + ending, acc_norm per byte "
                 f"| Q4_1 GGUF dequantised to fp32 | {n} | {100 * a['value']:.1f} "
                 f"| **{100 * an['value']:.1f}** ({100 * an['ci95'][0]:.1f}-{100 * an['ci95'][1]:.1f}) |")
    for name, v in PUBLISHED.items():
        lines.append(f"| {name} | lighteval, zero-shot (normalisation not stated) | bf16 original | 10,042 | - | {v:.1f} |")
    lines += ["", "Known differences: the bundled weights sit on a 4-bit group-32 grid (Q4_1), not the bf16 original; "
              "llama.cpp's HellaSwag text keeps ctx_b in lower case (the harness capitalises it); lighteval's prompt "
              "and normalisation may differ from the harness's."]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
