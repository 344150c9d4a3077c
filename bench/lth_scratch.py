"""Lottery-ticket rewinding from scratch: the rewound ticket vs the same mask re-initialised.

stories260K's architecture and tokenizer (Karpathy's llama2.c TinyStories model, 260K parameters,
from ``../shared/data``) with its weights thrown away: every run starts from a seeded random draw of
the model's own initialiser (:func:`modelpress.models.initialise.random_init_`, N(0, 0.02), norms at
one) and learns TinyStories from the hard labels alone (``losses: [{type: ce}]``, no teacher).
Rows, per seed (the seed picks the initialisation and the order of the training windows):

1. ``dense``: the dense model trained for the whole budget (``--steps``);
2. ``magnitude one-shot``: the dense model of row 1 pruned by magnitude, not retrained;
3. ``ticket``: the ``lottery`` stage (Frankle et al., 2020): train ``prune_at * steps`` steps, prune
   by magnitude, rewind every parameter to its value after ``rewind_step`` steps, retrain the
   ticket for the remaining steps;
4. ``control``: the same stage with ``reinit: true``: identical training, identical masks, but the
   survivors (and every other parameter) get a fresh random draw (seed ``1000 + seed``) instead of
   their step-k values, then the same retraining.

Rows 1, 3 and 4 train the same number of steps and tokens (3 and 4 in two phases). Every linear of
the blocks is pruned (per layer, unstructured); the tied embedding / classifier stays dense.
Quality: perplexity on held-out TinyStories text (the last ``--eval-chars`` characters of the
validation excerpt; training uses only the characters before, cut into consecutive windows, BOS
each), 256-token windows, BOS each.

The default budget (1000 steps x 8 x 256 = 2.05M tokens, lr 3e-3, k = 25) fits the staged text:
it holds only ~344K training tokens, so 1000 steps are ~6 epochs, about where a trial run's held-out
perplexity stopped falling (10.4 at 1000 steps, 10.5 at 1500); k = 25 is 5% of the 500 steps before
pruning (2.5% of the whole run, the end of the warm-up), inside the early range Frankle et al.
rewind to. Three seeds x (dense + ticket + control) took ~39 CPU minutes on one thread.

    python bench/lth_scratch.py --threads 1 --out bench/results/lth_scratch
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MODELPRESS_SHARED", ROOT.parent / "shared")) / "data"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(SHARED / "stories260k" / "stories260K.bin"),
                    help="architecture and tokenizer only: the weights are re-drawn")
    ap.add_argument("--text", default=str(SHARED / "tinystories" / "tinystories_val_head.txt"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--steps", type=int, default=1000, help="total optimizer steps of every trained row")
    ap.add_argument("--prune-at", type=float, default=0.5, help="lottery: fraction of the steps before pruning")
    ap.add_argument("--rewind-step", type=int, default=25, help="lottery: k, the step the ticket rewinds to")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-chars", type=int, default=100_000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True, help="output path without extension (.json and .md are written)")
    return ap.parse_args()


def windows(lm, text: str, seq_len: int) -> torch.Tensor:
    """The whole text as consecutive windows of BOS + ``seq_len - 1`` tokens (the tail dropped)."""
    ids = torch.tensor(lm.tokenizer.encode(text), dtype=torch.long)
    n = ids.numel() // (seq_len - 1)
    body = ids[: n * (seq_len - 1)].view(n, seq_len - 1)  # (windows, seq_len - 1)
    return torch.cat([torch.full((n, 1), lm.tokenizer.bos_token_id, dtype=torch.long), body], dim=1)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MODELPRESS_PROGRESS", "0")
    import modelpress as mp
    from modelpress.distill.trainer import TrainConfig, TrainData
    from modelpress.models.initialise import random_init_

    text = Path(args.text).read_text(encoding="utf-8")
    probe = mp.load(args.model)
    train = TrainData(windows(probe, text[: -args.eval_chars], args.seq_len))
    held_out = probe.tokenizer.encode(text[-args.eval_chars:])
    train_cfg = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "warmup": 0.05,
                 "schedule": "cosine", "clip": 1.0, "weight_decay": 0.0}
    lottery = {"method": "lottery", "ignore": ["lm_head"], "pattern": "unstructured", "sparsity": args.sparsity,
               "scope": "layer", "rewind_step": args.rewind_step, "prune_at": args.prune_at,
               "losses": [{"type": "ce"}]}
    before = TrainConfig(**train_cfg)
    meta = {k: getattr(args, k) for k in vars(args) if k != "out"} | {
        "torch": torch.__version__, "cpus": os.cpu_count(), "load_avg_start": os.getloadavg(),
        "eval_tokens": len(held_out), "train_windows": list(train.input_ids.shape),
        "train_stream_tokens": int(train.input_ids.numel()), "train": before.to_dict(), "lottery": lottery,
        "params": sum(p.numel() for p in probe.module.parameters())}
    rows: list[dict] = []

    def fresh(seed: int):
        lm = mp.load(args.model)
        random_init_(lm.module, seed)
        return lm

    def add(name: str, seed: int, lm, trained: list[dict], c0: float, **extra: object) -> None:
        rows.append({"row": name, "seed": seed, **measure(lm, held_out, args, meta["params"]),
                     "train_steps": sum(m["steps"] for m in trained), "train_tokens": sum(m["tokens"] for m in trained),
                     "train_cpu_s": sum(m["cpu_s"] for m in trained), "train_wall_s": sum(m["wall_s"] for m in trained),
                     "row_cpu_s": time.process_time() - c0, **extra, "load_avg": os.getloadavg()[0]})
        print(json.dumps(rows[-1]), flush=True)
        write(args.out, meta, rows)

    for seed in args.seeds:
        cfg = {**train_cfg, "seed": seed}
        c0 = time.process_time()
        lm = fresh(seed)
        dense = train_dense(lm, train, TrainConfig(**cfg))
        add("dense", seed, lm, [dense], c0)
        c0 = time.process_time()
        same = {k: lottery[k] for k in ("ignore", "pattern", "sparsity", "scope")}  # the lottery's masks' rule
        mp.compress(lm, {"stages": [{"method": "magnitude", **same}]}, progress=False)
        add("magnitude one-shot", seed, lm, [], c0)
        for name, extra in (("ticket", {}), ("control", {"reinit": True, "reinit_seed": 1000 + seed})):
            c0 = time.process_time()
            lm = fresh(seed)
            rep = mp.compress(lm, {"name": name, "stages": [{**lottery, **extra, "train": cfg}]}, train=train.input_ids,
                              progress=False)
            metrics = [m for st in rep["stages"] for m in st.get("metrics", [])]
            add(name, seed, lm, metrics, c0, prune_step=metrics[0]["prune_step"])


def train_dense(lm, train, cfg):
    """The dense reference: the lottery stage's own loop and loss (hard-label CE), without pruning."""
    from modelpress.distill.losses import hard_ce
    from modelpress.distill.trainer import Trainer

    lm.module.train().requires_grad_(True)

    def step(model, batch):
        return hard_ce(model(input_ids=batch.input_ids).logits, batch), int(batch.mask().sum())

    result = Trainer(lm.module, step, train, cfg, progress=False, description="dense").train()
    lm.module.eval().requires_grad_(False)
    return result.to_dict()


def measure(lm, held_out: list[int], args: argparse.Namespace, params: int) -> dict:
    """Held-out perplexity, the pruned layers' sparsity and the share of zero weights overall."""
    from modelpress.eval.perplexity import perplexity
    from modelpress.sparsity.layer import sparsity_summary

    s = sparsity_summary(lm.module)
    ppl = perplexity(lm.module, held_out, args.seq_len, bos_token_id=lm.tokenizer.bos_token_id).perplexity
    return {"perplexity": ppl, "sparsity": s["sparsity"], "zeros_of_all_params": s["zeros"] / params}


def summary(rows: list[dict]) -> list[dict]:
    """Mean and spread of the perplexity per row kind over the seeds, and the ticket's margin."""
    out = []
    for name in dict.fromkeys(r["row"] for r in rows):
        ppl = [r["perplexity"] for r in rows if r["row"] == name]
        out.append({"row": name, "seeds": len(ppl), "mean": statistics.fmean(ppl),
                    "sd": statistics.stdev(ppl) if len(ppl) > 1 else None})
    by = {(r["row"], r["seed"]): r["perplexity"] for r in rows}
    wins = [by[("control", s)] / by[("ticket", s)] for (n, s) in by if n == "ticket" and ("control", s) in by]
    if wins:
        out.append({"row": "control / ticket", "seeds": len(wins), "mean": statistics.fmean(wins),
                    "sd": statistics.stdev(wins) if len(wins) > 1 else None, "ticket_wins": sum(w > 1 for w in wins)})
    return out


def write(out: str, meta: dict, rows: list[dict]) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    summ = summary(rows)
    Path(out + ".json").write_text(json.dumps({"meta": meta, "rows": rows, "summary": summ}, indent=1))
    t = meta["train"]
    lines = [f"# Lottery-ticket rewinding from scratch, stories260K at {meta['sparsity']:.0%} sparsity", "",
             f"torch {meta['torch']}, {meta['threads']} thread(s), {meta['cpus']} CPUs, load average at start "
             f"{meta['load_avg_start'][0]:.2f}. Random init (seeded), hard-label CE on "
             f"{meta['train_stream_tokens']:,} TinyStories training tokens ({meta['train_windows'][0]} windows of "
             f"{meta['seq_len']}); held-out perplexity on {meta['eval_tokens']:,} tokens. Every trained row: "
             f"{t['steps']} steps x {t['batch_size']} x {meta['seq_len']} tokens, AdamW lr {t['lr']}, cosine, "
             f"warm-up {t['warmup']}; ticket / control: prune after {meta['prune_at']:.0%} of the steps, "
             f"rewind to step {meta['rewind_step']} (ticket) or fresh init (control), retrain the rest.", "",
             "| row | seed | perplexity | sparsity (pruned layers) | zeros / all params | train steps | train tokens "
             "| train CPU s | row CPU s | load |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['row']} | {r['seed']} | {r['perplexity']:.3f} | {r['sparsity']:.3f} | "
                     f"{r['zeros_of_all_params']:.3f} | {r['train_steps']} | {r['train_tokens']:,} | "
                     f"{r['train_cpu_s']:.1f} | {r['row_cpu_s']:.1f} | {r['load_avg']:.2f} |")
    lines += ["", "| row | seeds | mean | sd |", "|---|---|---|---|"]
    for s in summ:
        sd = f"{s['sd']:.3f}" if s["sd"] is not None else ""
        wins = f" (ticket better in {s['ticket_wins']} of {s['seeds']})" if "ticket_wins" in s else ""
        lines.append(f"| {s['row']}{wins} | {s['seeds']} | {s['mean']:.3f} | {sd} |")
    Path(out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
