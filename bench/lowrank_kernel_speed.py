"""Decode-like (batch 1) latency of one factorised layer: the reference against the ``lowrank`` kernels.

One SmolLM2-sized projection (576 -> 1536, the MLP up/gate shape; break-even rank
1536 * 576 / 2112 = 418.9) as a ``LowRankLinear`` at rank ~0.8 x break-even (335, factored is
cheaper) and above it (503, merged is cheaper), in fp32 and bf16. Variants per (rank, dtype):

- ``reference``: the LowRankLinear left as it is (in bf16: its factors cast, what ``cast_float_parts``
  does when the reference is kept);
- ``lowrank-factored`` and ``lowrank-merged``, each built directly, so both sides of the
  break-even rule are timed; ``auto`` (what ``install_kernels`` picks) is recorded beside them.

Timed round-robin at 1 thread (one call of each variant per round, so load from other processes on a
shared machine hits all alike); reported: median time per call and the median of per-round ratios
(with the interquartile range), as in ``bench/kernel_speed.py``.

    python bench/lowrank_kernel_speed.py --out bench/results/lowrank_kernels
    python bench/lowrank_kernel_speed.py --ranks 0.6,0.7,0.75 --out /tmp/lowrank_crossover  # where bf16 merged wins
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_speed import cpu_times, paired_ratios, quartiles, steal_fraction  # noqa: E402

OUT_F, IN_F = 1536, 576
NAMED = ("lowrank-factored", "lowrank-merged")


def layer(rank: int, seed: int = 0) -> nn.Module:
    """A LowRankLinear (out 1536, in 576) with random factors of ``rank`` and a bias."""
    from modelpress.lowrank import LowRankLinear

    g = torch.Generator().manual_seed(seed)
    B = torch.randn(OUT_F, rank, generator=g) / rank ** 0.5  # (out, r)
    A = torch.randn(rank, IN_F, generator=g) / IN_F ** 0.5  # (r, in)
    return LowRankLinear.from_factors(B, A, torch.randn(OUT_F, generator=g) * 0.1)


def variants(rank: int, dtype: torch.dtype) -> tuple[dict[str, nn.Module], str, dict[str, float]]:
    """name -> module for one (rank, dtype); the kernel auto picks; each module's max relative error vs fp32."""
    from modelpress.kernels import KERNELS, install_kernels
    from modelpress.kernels.lowrank import FactorPair

    base = layer(rank)
    mods: dict[str, nn.Module] = {"reference": copy.deepcopy(base).to(dtype)}
    for k in NAMED:  # built directly: a named merge below the break-even would fall back to the reference
        mods[k] = KERNELS.get(k).build(FactorPair.of(base), base.bias.detach(), torch.device("cpu"), dtype)
    auto = install_kernels(nn.Sequential(copy.deepcopy(base)), dtype=dtype).rows[0][1]
    x = torch.randn(8, IN_F)
    with torch.inference_mode():
        ref = base(x)
        errs = {n: float((m(x.to(dtype)).float() - ref).abs().max() / ref.abs().max()) for n, m in mods.items()}
    return mods, auto, errs


def time_round_robin(mods: dict[tuple[str, str], nn.Module], rounds: int) -> dict[tuple[str, str], list[float]]:
    """Seconds per batch-1 call of each (dtype, variant) module in every round, calls interleaved."""
    xs = {key: torch.randn(1, IN_F).to(getattr(torch, key[0])) for key in mods}  # (batch 1, in): one token
    times: dict[tuple[str, str], list[float]] = {key: [] for key in mods}
    with torch.inference_mode():
        for _ in range(50):  # warm-up, discarded
            for key, m in mods.items():
                m(xs[key])
        for _ in range(rounds):
            for key, m in mods.items():
                t = time.perf_counter()
                m(xs[key])
                times[key].append(time.perf_counter() - t)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3000)
    ap.add_argument("--ranks", default="0.8,1.2", help="ranks as fractions of the break-even rank")
    ap.add_argument("--out", default="bench/results/lowrank_kernels")
    args = ap.parse_args()
    torch.set_num_threads(1)
    break_even = OUT_F * IN_F / (OUT_F + IN_F)
    ranks = [round(float(f) * break_even) for f in args.ranks.split(",")]
    rows, steal0 = [], cpu_times()
    for rank in ranks:
        mods, autos, errs = {}, {}, {}
        for dtype in ("float32", "bfloat16"):  # both in one round-robin: the cross-dtype ratios are paired too
            ms, autos[dtype], es = variants(rank, getattr(torch, dtype))
            mods.update({(dtype, n): m for n, m in ms.items()})
            errs.update({(dtype, n): e for n, e in es.items()})
        times = time_round_robin(mods, args.rounds)
        ref32 = times[("float32", "reference")]
        for (dtype, n), ts in times.items():
            vs_ref = paired_ratios(times[(dtype, "reference")], ts)
            rows.append({"rank": rank, "dtype": dtype, "variant": n, "auto": n == autos[dtype],
                         "us": 1e6 * statistics.median(ts), "speedup_vs_reference": statistics.median(vs_ref),
                         "speedup_vs_reference_iqr": quartiles(vs_ref),
                         "speedup_vs_fp32_reference": statistics.median(paired_ratios(ref32, ts)),
                         "max_rel_error_vs_fp32": errs[(dtype, n)]})
        print(json.dumps(rows[-len(times):]), flush=True)
    meta = {"shape": [OUT_F, IN_F], "break_even_rank": break_even, "ranks": list(ranks), "threads": 1,
            "rounds": args.rounds, "torch": torch.__version__, "cpus": os.cpu_count(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "load_avg_at_end": os.getloadavg(),
            "cpu_steal_fraction": steal_fraction(steal0, cpu_times())}
    write(args.out, meta, rows)
    return 0


def write(out: str, meta: dict, rows: list[dict]) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    steal = meta["cpu_steal_fraction"]
    lines = [f"# Factorised layer {meta['shape'][0]}x{meta['shape'][1]} (out x in), batch 1, 1 thread, torch "
             f"{meta['torch']}, {meta['cpu_capability']}, median of {meta['rounds']} round-robin calls", "",
             f"Break-even rank {meta['break_even_rank']:.1f}; ranks {', '.join(map(str, meta['ranks']))} "
             "(below it factored is cheaper by multiply-adds, at or above it merged). Load average at the end: "
             f"{', '.join(f'{x:.1f}' for x in meta['load_avg_at_end'])}; CPU time stolen by the hypervisor: "
             f"{'n/a' if steal is None else f'{100 * steal:.1f}%'} (shared machine).", "",
             "Speed-ups are medians of per-round ratios reference / variant (each from back-to-back calls), "
             "with the interquartile range, against the reference of the same dtype and against the fp32 "
             "reference; * marks what `install_kernels` picks (auto).", "",
             "| rank | dtype | variant | median us | x reference, same dtype (IQR) | x fp32 reference "
             "| max rel. error vs fp32 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["speedup_vs_reference_iqr"]
        lines.append(f"| {r['rank']} | {r['dtype']} | {r['variant']}{' *' if r['auto'] else ''} | {r['us']:.1f} | "
                     f"{r['speedup_vs_reference']:.2f} ({lo:.2f}-{hi:.2f}) | {r['speedup_vs_fp32_reference']:.2f} "
                     f"| {r['max_rel_error_vs_fp32']:.1e} |")
    Path(out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
