"""``modelpress bench``: latency, throughput, memory, size, cost and roofline of a model (and a baseline).

The measuring lives in :mod:`modelpress.eval.perf`; this module only parses, runs each model in its
own process, and writes JSON + a short table.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from ..core.errors import ModelpressError
from . import args as A
from .output import write_json

HELP = "time to first token, decode latency, tokens/s at batch 1/4/16, memory, size, cost, roofline"


def add_parser(sub: Any) -> None:
    """Register the ``bench`` subcommand on the CLI's subparsers."""
    b = sub.add_parser("bench", help=HELP)
    b.add_argument("--model", required=True, help="model to measure (any --model accepted by compress/eval)")
    b.add_argument("--baseline", help="also measure this model in the same run (e.g. the float original)")
    b.add_argument("--json", dest="json_out", help="write the measurements here")
    b.add_argument("--price-per-hour", type=A.positive_float, help="machine price per hour, for cost per million tokens")
    b.add_argument("--threads", type=A.thread_count, default=2, help="torch threads (default 2)")
    b.add_argument("--batches", type=A.positive_int, nargs="+", default=[1, 4, 16], help="batch sizes (default 1 4 16)")
    b.add_argument("--prompt-len", type=A.positive_int, default=128, help="prompt tokens (random ids, default 128)")
    b.add_argument("--new-tokens", type=A.window_len, default=64, help="tokens generated per prompt (default 64)")
    b.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="activation dtype (default bfloat16: where the int4/int8 CPU kernels are fast)")
    b.add_argument("--kernel", help="kernel for quantised layers: auto (default), reference, or a registered name "
                                    "(also $MODELPRESS_KERNEL); a kernel that cannot run falls back with a note")
    b.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    b.add_argument("--same-process", action="store_true",
                   help="measure in this process instead of a fresh one per model (faster start; peak RSS is then "
                        "the whole run's, not each model's own)")
    b.add_argument("--bandwidth-mib", type=A.positive_int, default=256, help="buffer for the bandwidth measurement (default 256)")


def cmd_bench(args: argparse.Namespace) -> int:
    from ..eval.perf import machine_info, measure_bandwidth, measure_in_subprocess, profile_model
    from ..kernels.registry import requested_kernel

    if args.threads < 1 or min(args.batches) < 1 or args.prompt_len < 1 or args.new_tokens < 2:
        raise ModelpressError("--threads, --batches and --prompt-len must be >= 1 and --new-tokens >= 2")
    kernel = requested_kernel(args.kernel)  # unknown names fail here, before any loading
    import torch

    torch.set_num_threads(args.threads)
    bw = measure_bandwidth(args.bandwidth_mib << 20)
    common = dict(threads=args.threads, batches=tuple(args.batches), prompt_len=args.prompt_len,
                  new_tokens=args.new_tokens, dtype=args.dtype, kernel=kernel, compile=args.compile,
                  bandwidth=bw["read_bytes_per_s"], price_per_hour=args.price_per_hour)
    measure = profile_model if args.same_process else measure_in_subprocess
    comp = measure(model=args.model, **common)
    base = measure(model=args.baseline, **common) if args.baseline else None
    out: dict[str, Any] = {k: comp[k] for k in ("decode_tokens_per_s", "prefill_tokens_per_s", "peak_rss_bytes",
                                                "size_bytes", "ttft_s", "decode_latency_ms")}
    out.update(machine=machine_info(), bandwidth=bw, same_process=args.same_process, price_per_hour=args.price_per_hour, model=comp, baseline=base)
    if base:
        out["speedup_decode"] = comp["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        out["size_ratio"] = comp["size_bytes"] / base["size_bytes"] if comp["size_bytes"] and base["size_bytes"] else None
    if args.json_out:
        write_json(args.json_out, out)
    _print(comp, base, bw)
    return 0


def _print(comp: dict[str, Any], base: dict[str, Any] | None, bw: dict[str, float]) -> None:
    print(f"memory bandwidth (sum of {bw['buffer_bytes'] / 2**20:.0f} MiB): {bw['read_bytes_per_s'] / 1e9:.1f} GB/s",
          file=sys.stderr)
    for role, r in (("baseline", base), ("model", comp)):
        if r is None:
            continue
        tps = ", ".join(f"b{b}: {v['decode_tokens_per_s']:.1f}" for b, v in r["batches"].items())
        cost = r["cost_per_million_tokens"].get("1")
        print(f"{role} {r['model']}: TTFT {r['ttft_s'] * 1e3:.0f} ms, decode {r['decode_latency_ms']:.1f} ms/token, "
              f"tokens/s {tps}; prefill {r['prefill_tokens_per_s']:.0f} tok/s; peak RSS "
              f"{r['peak_rss_bytes'] / 2**20:.0f} MiB; size on disk "
              f"{'-' if r['size_bytes'] is None else format(r['size_bytes'] / 2**20, '.1f') + ' MiB'}; roofline "
              f"{r['roofline']['fraction_of_roofline']:.0%} of {r['roofline']['max_tokens_per_s']:.0f} tok/s"
              + (f"; ${cost:.3f}/M tokens (batch 1)" if cost is not None else ""), file=sys.stderr)
        for note in r["kernels"]["notes"]:
            print(f"  kernel note: {note}", file=sys.stderr)
