"""Pruning during training vs one-shot pruning at high sparsity, at equal training tokens.

stories260K (Karpathy's llama2.c TinyStories model, 260K parameters, from ``../shared/data``),
every linear layer of the blocks pruned (the tied embedding / classifier kept), rows in one run:

1. the float model;
2. one-shot magnitude pruning (``magnitude``, no training);
3. one-shot magnitude + ``recover`` (distil the float model into the pruned one);
4. ``imp-cubic-90``: gradual magnitude pruning on the cubic schedule while training;
5. ``movement-90``: hard movement pruning while training;
6. ``lth-rewind-80``: train, prune by magnitude, rewind to step k, retrain the ticket.

Every trained row uses the built-in recipe's stage with the sparsity, steps, batch and learning rate
set here (the same for all), the same loss (``auto``: KD at T=2 from the float reference mixed half
and half with hard labels) and the same training windows, so all see the same training tokens.
Quality: perplexity on held-out TinyStories text (the last ``--eval-chars`` characters of the
validation excerpt; training windows come from the characters before), 256-token windows, BOS each.

    python bench/prune_training.py --threads 1 --out bench/results/prune_training
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MODELPRESS_SHARED", ROOT.parent / "shared")) / "data"
ROWS = [("magnitude+recover", None), ("imp-cubic", "imp-cubic-90"), ("movement", "movement-90"),
        ("lth-rewind", "lth-rewind-80")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(SHARED / "stories260k" / "stories260K.bin"))
    ap.add_argument("--text", default=str(SHARED / "tinystories" / "tinystories_val_head.txt"))
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--steps", type=int, default=None, help="default: the built-in recipes' (400)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the built-in recipes' (8)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=None, help="default: the built-in recipes' (1e-3)")
    ap.add_argument("--windows", type=int, default=1024, help="training windows drawn from the training text")
    ap.add_argument("--eval-chars", type=int, default=100_000)
    ap.add_argument("--rows", nargs="*", default=[r for r, _ in ROWS])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True, help="output path without extension (.json and .md are written)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MODELPRESS_PROGRESS", "0")
    import modelpress as mp
    from modelpress.api import training_for
    from modelpress.eval.perplexity import perplexity
    from modelpress.pipeline.recipe import load_recipe

    text = Path(args.text).read_text(encoding="utf-8")
    tmp = Path(tempfile.mkdtemp(prefix="mp-prune-training-"))
    (tmp / "train.txt").write_text(text[: -args.eval_chars], encoding="utf-8")
    base = mp.load(args.model)
    held_out = base.tokenizer.encode(text[-args.eval_chars:])
    bos = base.tokenizer.bos_token_id if base.add_bos else None
    train = training_for(base, tmp / "train.txt", args.windows, args.seq_len, seed=0)

    def ppl(module: torch.nn.Module) -> float:
        return perplexity(module, held_out, args.seq_len, bos_token_id=bos).perplexity

    meta = {k: getattr(args, k) for k in vars(args) if k != "out"} | {
        "torch": torch.__version__, "cpus": os.cpu_count(), "load_avg_start": os.getloadavg(),
        "eval_tokens": len(held_out), "train_windows": list(train.input_ids.shape)}
    given = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr}
    budget = {**load_recipe("imp-cubic-90").stages[0].train.to_dict(), **{k: v for k, v in given.items() if v}}
    meta.update(budget)
    rows: list[dict] = []

    def add(name: str, lm, report: dict | None, **extra: object) -> None:
        from modelpress.sparsity.layer import sparsity_summary

        trained = [m for st in (report or {}).get("stages", []) for m in st.get("metrics", [])]
        rows.append({"row": name, "perplexity": ppl(lm.module), "sparsity": sparsity_summary(lm.module)["sparsity"],
                     "train_steps": sum(m["steps"] for m in trained), "train_tokens": sum(m["tokens"] for m in trained),
                     "train_cpu_s": sum(m["cpu_s"] for m in trained), "train_wall_s": sum(m["wall_s"] for m in trained),
                     **extra, "load_avg": os.getloadavg()[0]})
        print(json.dumps(rows[-1]), flush=True)
        write(args.out, meta, rows)

    add("float", base, None)
    magnitude = {"method": "magnitude", "sparsity": args.sparsity}
    lm = mp.load(args.model)
    add("magnitude one-shot", lm, mp.compress(lm, {"stages": [magnitude]}, progress=False))
    for name, recipe in ROWS:
        if name not in args.rows:
            continue
        if recipe is None:
            stages = [magnitude, {"method": "recover", "train": budget}]
        else:
            stage = load_recipe(recipe).stages[0].to_dict()
            stages = [{**stage, "sparsity": args.sparsity, "train": {**stage["train"], **budget}}]
        lm = mp.load(args.model)
        t0, c0 = time.perf_counter(), time.process_time()
        rep = mp.compress(lm, {"name": name, "stages": stages}, train=train, progress=False)
        add(name, lm, rep, recipe=recipe, run_wall_s=time.perf_counter() - t0, run_cpu_s=time.process_time() - c0)


def write(out: str, meta: dict, rows: list[dict]) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    ref = {r["row"]: r["perplexity"] for r in rows}
    for r in rows:
        r["ppl_vs_float"] = r["perplexity"] / ref["float"]
        r["ppl_vs_oneshot"] = r["perplexity"] / ref["magnitude one-shot"] if "magnitude one-shot" in ref else None
    Path(out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Pruning during training, stories260K at {meta['sparsity']:.0%} sparsity", "",
             f"torch {meta['torch']}, {meta['threads']} thread(s), {meta['cpus']} CPUs, load average at start "
             f"{meta['load_avg_start'][0]:.2f}; held-out TinyStories: {meta['eval_tokens']:,} tokens in "
             f"{meta['seq_len']}-token windows; each trained row: {meta['steps']} steps x {meta['batch_size']} x "
             f"{meta['seq_len']} tokens, lr {meta['lr']}.", "",
             "| row | sparsity | perplexity | x float | x one-shot | train tokens | train CPU s | train wall s | load |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs = f"{r['ppl_vs_oneshot']:.3f}" if r["ppl_vs_oneshot"] is not None else ""
        lines.append(f"| {r['row']} | {r['sparsity']:.3f} | {r['perplexity']:.3f} | {r['ppl_vs_float']:.3f} | {vs} | "
                     f"{r['train_tokens']:,} | {r['train_cpu_s']:.1f} | {r['train_wall_s']:.1f} | {r['load_avg']:.2f} |")
    Path(out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
