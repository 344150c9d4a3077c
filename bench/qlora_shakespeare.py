"""QLoRA on our NF4 SmolLM2-135M vs LoRA on the fp32 model, fine-tuned on Tiny Shakespeare.

Both rows train the same LoRA adapter (rank 16, alpha 32, every linear of the decoder blocks, PEFT
through ``modelpress.lowrank.adapters``) for the same fixed budget (``--steps`` x ``--batch``
sequences of ``--seq-len`` tokens, windows sampled from the first 90% of the text, AdamW lr 5e-4,
cosine schedule with warm-up). The last 10% of the text is held back: its first ``--eval-tokens``
tokens are scored (perplexity, windows of ``--eval-seq-len``) before and after training.

* ``qlora``: the base is ``qlora-nf4`` (NF4, double-quantised absmax, blocks of 64, lm_head and the
  tied embedding kept), quantised and saved in a preparation process; the training process loads
  the packed folder, so its memory is that of QLoRA training. The adapter is then merged into the
  base (re-quantised NF4) and the merged model scored too, with the merge's reported error.
* ``lora-fp32``: the bundled fp32 model, same adapter.

Each row runs in its own process with one torch thread. Memory: RSS just before training (after
freed heap pages are handed back to the OS, so it is the live model, tokenizer and libraries),
the peak sampled every 20 ms during training only (``train_peak_rss``), and the process-lifetime
peak (``ru_maxrss``, which includes loading and evaluation). CPU seconds are what the process used (the machine is shared; the
1-minute load average before and after is recorded).

    python bench/qlora_shakespeare.py --out bench/results/qlora_shakespeare
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
MODEL = "bundled:smollm2-135m-instruct"
HELD_BACK = 0.10  # last share of the text never trained on
LR = 5e-4


def split_text(workdir: Path) -> tuple[Path, Path]:
    """Train / held-back files: the text cut at the line break nearest 90% of its length."""
    text = TEXT.read_text(encoding="utf-8")
    cut = text.rfind("\n", 0, int(len(text) * (1 - HELD_BACK))) + 1
    train, held = workdir / "train.txt", workdir / "heldback.txt"
    train.write_text(text[:cut], encoding="utf-8")
    held.write_text(text[cut:], encoding="utf-8")
    return train, held


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise)."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS:"))


class PeakRSS:
    """Largest resident set size seen while the block runs (sampled every 20 ms)."""

    def __enter__(self) -> "PeakRSS":
        self.peak, self._stop = rss_bytes(), threading.Event()
        self._t = threading.Thread(target=self._watch, daemon=True)
        self._t.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_bytes())


def ppl(lm, held: Path, args: argparse.Namespace) -> float | None:
    import modelpress as mp

    if not args.eval_tokens:  # --eval-tokens 0: a memory-only run
        return None
    return mp.evaluate(lm, held, seq_len=args.eval_seq_len, max_tokens=args.eval_tokens, progress=False)["perplexity"]


# ---- one row, in its own process -------------------------------------------------------------------
def prepare(args: argparse.Namespace) -> dict:
    """Quantise the fp32 model with qlora-nf4 and save it (the QLoRA base)."""
    import modelpress as mp

    t0, c0 = time.perf_counter(), time.process_time()
    lm = mp.load(MODEL)
    mp.compress(lm, "qlora-nf4", progress=False)
    mp.save(lm, args.base, recipe="qlora-nf4")
    return {"quantise_wall_s": time.perf_counter() - t0, "quantise_cpu_s": time.process_time() - c0}


def row(args: argparse.Namespace) -> dict:
    import torch

    import modelpress as mp
    from modelpress.api import training_for
    from modelpress.distill.trainer import TrainConfig
    from modelpress.lowrank.adapters import AdapterConfig, attach, merge_adapter, train_adapter

    train_txt, held = Path(args.train_txt), Path(args.held_txt)
    lm = mp.load(args.base if args.variant == "qlora" else MODEL)
    out = {"variant": args.variant, "ppl_before": ppl(lm, held, args)}
    data = training_for(lm, train_txt, n_samples=args.steps * args.batch, seq_len=args.seq_len, seed=0)
    cfg = AdapterConfig(method="lora", r=16, alpha=32)
    pm = attach(lm.module, cfg)
    if args.checkpointing:  # recompute each block's activations in backward (torch's non-reentrant checkpoint)
        pm.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    out["trainable_params"], out["all_params"] = (int(x) for x in pm.get_nb_trainable_parameters())
    release_freed_memory()  # what loading and evaluating freed goes back to the OS: RSS = live memory
    out["rss_before_train"] = rss_bytes()
    with PeakRSS() as peak:
        res = train_adapter(pm, data, TrainConfig(steps=args.steps, batch_size=args.batch, lr=LR, warmup=0.1,
                                                  log_every=10), progress=False)
    out |= {"train": res.to_dict(), "train_peak_rss": peak.peak}
    lm.module = pm
    out["ppl_after"] = ppl(lm, held, args)
    if args.variant == "qlora" and args.eval_tokens:
        ids = lm.tokenizer.encode(held.read_text(encoding="utf-8"))[: 2 * args.seq_len]
        merged, rep = merge_adapter(pm, torch.tensor(ids).view(2, args.seq_len))
        lm.module = merged
        out["merge"] = {k: v for k, v in rep.to_dict().items() if k != "layer_errors"}
        out["ppl_after_merge"] = ppl(lm, held, args)
    out["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


# ---- the driver ------------------------------------------------------------------------------------
def run_child(argv: list[str]) -> dict:
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MODELPRESS_PROGRESS": "0"}
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = Path(f.name)
    subprocess.run([sys.executable, __file__, *argv, "--result", str(result)], check=True, env=env)
    out = json.loads(result.read_text())
    result.unlink()
    return out | {"process_wall_s": time.perf_counter() - t0, "load_avg_before": load0, "load_avg_after": os.getloadavg()[0]}


def markdown(res: dict) -> str:
    b = res["budget"]
    mb = lambda x: f"{x / 2**20:,.0f} MB"  # noqa: E731
    ppl_text = (f"held-back PPL on the first {b['eval_tokens']:,} tokens of the last 10% of the text (windows of "
                f"{b['eval_seq_len']})" if b["eval_tokens"] else "memory only (no PPL)")
    lines = [f"# QLoRA (qlora-nf4 + LoRA) vs LoRA on fp32 — SmolLM2-135M on Tiny Shakespeare\n",
             f"Budget per row: {b['steps']} steps x {b['batch']} x {b['seq_len']} tokens, AdamW lr {b.get('lr', LR):g}"
             f"{', gradient checkpointing' if b.get('checkpointing') else ''}; LoRA r=16, alpha=32 on every decoder "
             f"linear; {ppl_text}. 1 torch thread, shared 2-core CPU.\n",
             "| base | PPL before | PPL after | tokens | train CPU s | train wall s | RSS before training | peak RSS in training | peak RSS (process) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        t = r["train"]
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        lines.append(f"| {r['variant']} | {fmt(r['ppl_before'])} | {fmt(r['ppl_after'])} | {t['tokens']:,} | {t['cpu_s']:.0f} | "
                     f"{t['wall_s']:.0f} | {mb(r['rss_before_train'])} | {mb(r['train_peak_rss'])} | {mb(r['ru_maxrss'])} |")
    q = next((r for r in res["rows"] if "merge" in r), None)
    if q:
        m = q["merge"]
        lines.append(f"\nMerged into the NF4 base (re-quantised, {m['requantised_layers']} layers): PPL "
                     f"{q['ppl_after_merge']:.2f}; logits relative error vs the unmerged adapter "
                     f"{m['output_rel_error']:.4f} on {m['probe_tokens']} held-back tokens; weight error "
                     f"||Q(W')-W'||/||W'|| mean {m['weight_rel_error_mean']:.4f}; share of the adapter's update lost "
                     f"mean {m['delta_lost_mean']:.3f}, max {m['delta_lost_max']:.3f}.")
    lines.append(f"\nQuantising the base (qlora-nf4, RTN): {res['prepare']['quantise_cpu_s']:.0f} CPU s.")
    lines += [f"\nNote: {n}" for n in res.get("notes", [])]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "qlora_shakespeare"))
    ap.add_argument("--variants", default="qlora,lora-fp32")
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in both rows")
    ap.add_argument("--render", help="only rewrite the Markdown of this result JSON (adding --note to it)")
    ap.add_argument("--note", action="append", default=[], help="with --render: a note kept in the JSON")
    # child-process options
    ap.add_argument("--role", choices=["driver", "prepare", "row"], default="driver")
    ap.add_argument("--variant")
    ap.add_argument("--base")
    ap.add_argument("--train-txt")
    ap.add_argument("--held-txt")
    ap.add_argument("--result")
    args = ap.parse_args()
    if args.role != "driver":
        import torch

        torch.set_num_threads(1)
        out = prepare(args) if args.role == "prepare" else row(args)
        Path(args.result).write_text(json.dumps(out, default=str))
        return
    if args.render:
        res = json.loads(Path(args.render).read_text())
        res["notes"] = res.get("notes", []) + args.note
        Path(args.render).write_text(json.dumps(res, indent=1, default=str))
        Path(args.render).with_suffix(".md").write_text(markdown(res))
        return
    common = ["--steps", str(args.steps), "--batch", str(args.batch), "--seq-len", str(args.seq_len),
              "--eval-tokens", str(args.eval_tokens), "--eval-seq-len", str(args.eval_seq_len)] + \
        (["--checkpointing"] if args.checkpointing else [])
    with tempfile.TemporaryDirectory() as tmp:
        train_txt, held = split_text(Path(tmp))
        base = Path(tmp) / "smollm2-qlora-nf4"
        res = {"model": MODEL, "budget": {"steps": args.steps, "batch": args.batch, "seq_len": args.seq_len,
                                          "eval_tokens": args.eval_tokens, "eval_seq_len": args.eval_seq_len,
                                          "lr": LR, "checkpointing": args.checkpointing},
               "prepare": run_child(["--role", "prepare", "--base", str(base), *common]), "rows": []}
        for v in args.variants.split(","):
            res["rows"].append(run_child(["--role", "row", "--variant", v, "--base", str(base), "--train-txt",
                                          str(train_txt), "--held-txt", str(held), *common]))
            Path(args.out + ".json").write_text(json.dumps(res, indent=1, default=str))
    Path(args.out + ".md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
