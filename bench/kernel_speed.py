"""Weight-only linear kernels against dense fp32 / bf16, one run, fixed threads.

W4 (groups of 128, int4pack) and W8 (per channel, int8pack; also fbgemm dynamic int8) at
4096x4096 and 11008x4096 (out x in), batch 1 and 8. Every variant is built from the same random
weight through our IntFormat and the kernel registry, checked against the dequantised reference,
and timed round-robin (one call of each variant per round, so load from other processes on a
shared machine hits all variants alike). Reported: the median time over rounds, and the speed-up
over fp32 as the median (and interquartile range) of the per-round ratios, each ratio taken from
two calls made back to back, which is what stays stable when neighbours on the host come and go.
The CPU time stolen by the hypervisor during the run is read from /proc/stat and printed.

    python bench/kernel_speed.py --threads 2 --out bench/results/kernels
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
                     rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each fn in every round, calls interleaved round by round."""
    xs = {name: torch.randn(m, k).to(torch.bfloat16 if "(bf16)" in name or "bf16" in name else torch.float32)
          for name in fns}
    for _ in range(5):  # warm-up rounds, discarded (first touches, thread pools, clocks)
        for name, f in fns.items():
            f(xs[name])
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, f in fns.items():
            t = time.perf_counter()
            f(xs[name])
            times[name].append(time.perf_counter() - t)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--out", default="bench/results/kernels")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows, errors = [], {}
    steal0 = cpu_times()
    for n, k in SHAPES:
        fns, errs = variants(n, k)
        errors[f"{n}x{k}"] = errs
        for m in BATCHES:
            times = time_round_robin(fns, m, k, args.rounds)
            for name, ts in times.items():
                vs32 = paired_ratios(times["fp32 dense"], ts)
                rows.append({"shape": f"{n}x{k}", "batch": m, "variant": name, "ms": 1e3 * statistics.median(ts),
                             "speedup_vs_fp32": statistics.median(vs32),
                             "speedup_vs_fp32_iqr": quartiles(vs32),
                             "speedup_vs_bf16": statistics.median(paired_ratios(times["bf16 dense"], ts))})
            print(json.dumps(rows[-len(times):]), flush=True)
    meta = {"threads": args.threads, "rounds": args.rounds, "torch": torch.__version__, "cpus": os.cpu_count(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "load_avg_at_end": os.getloadavg(),
            "cpu_steal_fraction": steal_fraction(steal0, cpu_times()),
            "max_rel_error_vs_reference": errors}
    write(args.out, meta, rows)
    return 0


def paired_ratios(base: list[float], other: list[float]) -> list[float]:
    """base / other round by round (> 1: ``other`` is faster)."""
    return [b / o for b, o in zip(base, other)]


def quartiles(v: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(v, n=4)
    return q[0], q[2]


def cpu_times() -> list[int]:
    """The aggregate ``cpu`` line of /proc/stat (jiffies), or [] where there is none."""
    try:
        return [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return []


def steal_fraction(before: list[int], after: list[int]) -> float | None:
    """Share of CPU time the hypervisor gave to other guests between two readings (8th field)."""
    if len(before) < 8 or len(after) < 8:
        return None
    total = sum(after) - sum(before)
    return (after[7] - before[7]) / total if total else None


def write(out: str, meta: dict, rows: list[dict]) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# Weight-only linear kernels ({meta['threads']} threads, torch {meta['torch']}, "
             f"{meta['cpu_capability']}, median of {meta['rounds']} round-robin calls)", "",
             f"load average at the end of the run: {', '.join(f'{x:.1f}' for x in meta['load_avg_at_end'])}; "
             f"CPU time stolen by the hypervisor during the run: {_pct(meta.get('cpu_steal_fraction'))} "
             "(shared machine)", "",
             "Speed-ups are medians of per-round ratios (each from two back-to-back calls), with the "
             "interquartile range.", "",
             "| shape (out x in) | batch | variant | median ms | x fp32 dense (IQR) | x bf16 dense |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["speedup_vs_fp32_iqr"]
        lines.append(f"| {r['shape']} | {r['batch']} | {r['variant']} | {r['ms']:.3f} | "
                     f"{r['speedup_vs_fp32']:.2f} ({lo:.2f}-{hi:.2f}) | {r['speedup_vs_bf16']:.2f} |")
    lines += ["", "max relative error of each kernel against the dequantised reference (same input rounding):", ""]
    for shape, errs in meta["max_rel_error_vs_reference"].items():
        lines.append(f"- {shape}: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    Path(out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


if __name__ == "__main__":
    sys.exit(main())
