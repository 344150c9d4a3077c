"""Weight-only linear kernels against dense fp32 / bf16, one run, fixed threads.

W4 (groups of 128, int4pack) and W8 (per channel, int8pack; also fbgemm dynamic int8) at
4096x4096 and 11008x4096 (out x in), batch 1 and 8. Every variant is built from the same random
weight through our IntFormat and the kernel registry, checked against the dequantised reference,
and timed round-robin (one call of each variant per round, so load from other processes on a
shared machine hits all variants alike); the median over rounds is reported.

    python bench/kernels.py --threads 2 --out bench/results/kernels
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

SHAPES = ((4096, 4096), (11008, 4096))
BATCHES = (1, 8)


def variants(n: int, k: int, seed: int = 0) -> tuple[dict[str, Callable[[torch.Tensor], torch.Tensor]], dict[str, float]]:
    """name -> fn(x fp32) for one weight shape, plus each kernel's max relative error vs its reference."""
    from modelpress.kernels import KERNELS
    from modelpress.quant.formats import IntFormat

    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02  # (out, in)
    w16 = w.bfloat16()
    q4 = IntFormat(bits=4, granularity=128).quantize(w)
    q8 = IntFormat(bits=8).quantize(w)
    cpu = torch.device("cpu")
    k4 = KERNELS.get("int4pack").build(q4, None, cpu, torch.bfloat16)
    k8 = KERNELS.get("int8pack").build(q8, None, cpu, torch.bfloat16)
    kd = KERNELS.get("int8-dynamic").build(q8, None, cpu, torch.float32)
    x = torch.randn(4, k)
    errs = {}
    for name, mod, qt in (("int4pack", k4, q4), ("int8pack", k8, q8), ("int8-dynamic", kd, q8)):
        ref = F.linear(x.bfloat16().float() if name != "int8-dynamic" else x, qt.dequantize())
        errs[name] = float((mod(x).float() - ref).abs().max() / ref.abs().max())
    del q4, q8
    fns = {
        "fp32 dense": lambda a: F.linear(a, w),
        "bf16 dense": lambda a: F.linear(a, w16),
        "W4 g128 int4pack (bf16)": lambda a: k4.matmul(a),
        "W8 int8pack (bf16)": lambda a: k8.matmul(a),
        "W8 int8-dynamic (fp32)": lambda a: kd.matmul(a),
    }
    return fns, errs


def time_round_robin(fns: dict[str, Callable[[torch.Tensor], torch.Tensor]], m: int, k: int,
                     rounds: int) -> dict[str, float]:
    """Median seconds per call of each fn, calls interleaved round by round."""
    xs = {name: torch.randn(m, k).to(torch.bfloat16 if "(bf16)" in name or "bf16" in name else torch.float32)
          for name in fns}
    for name, f in fns.items():  # warm-up
        f(xs[name])
        f(xs[name])
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, f in fns.items():
            t = time.perf_counter()
            f(xs[name])
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--out", default="bench/results/kernels")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows, errors = [], {}
    for n, k in SHAPES:
        fns, errs = variants(n, k)
        errors[f"{n}x{k}"] = errs
        for m in BATCHES:
            med = time_round_robin(fns, m, k, args.rounds)
            base = med["fp32 dense"]
            for name, s in med.items():
                rows.append({"shape": f"{n}x{k}", "batch": m, "variant": name, "ms": 1e3 * s,
                             "speedup_vs_fp32": base / s, "speedup_vs_bf16": med["bf16 dense"] / s})
            print(json.dumps(rows[-len(med):]), flush=True)
    meta = {"threads": args.threads, "rounds": args.rounds, "torch": torch.__version__, "cpus": os.cpu_count(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "load_avg_at_end": os.getloadavg(),
            "max_rel_error_vs_reference": errors}
    write(args.out, meta, rows)
    return 0


def write(out: str, meta: dict, rows: list[dict]) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# Weight-only linear kernels ({meta['threads']} threads, torch {meta['torch']}, "
             f"{meta['cpu_capability']}, median of {meta['rounds']} round-robin calls)", "",
             f"load average at the end of the run: {', '.join(f'{x:.1f}' for x in meta['load_avg_at_end'])} "
             "(shared machine)", "",
             "| shape (out x in) | batch | variant | ms | x fp32 dense | x bf16 dense |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['batch']} | {r['variant']} | {r['ms']:.3f} | "
                     f"{r['speedup_vs_fp32']:.2f} | {r['speedup_vs_bf16']:.2f} |")
    lines += ["", "max relative error of each kernel against the dequantised reference (same input rounding):", ""]
    for shape, errs in meta["max_rel_error_vs_reference"].items():
        lines.append(f"- {shape}: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    Path(out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
