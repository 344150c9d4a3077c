"""How far float rounding alone moves GPTQ's ΔPPL: one recipe, the inverse Cholesky done four ways.

GPTQ rounds 30 blocks of weights in sequence, each against inputs produced by the blocks already
rounded, so a difference in the last bits of ``(H + damp I)^-1`` can flip a few codes early and the
result drifts. This runs ``bench/quant_table.py`` (same model, calibration and eval ids) once per
variant, each in its own process (``--jobs`` at a time), with ``modelpress.calib.obs.inverse_cholesky_``
swapped for:

* ``lapack-f32``: the library's own route (float32, potrf/potri/potrf in place, scipy's LAPACK);
* ``torch-f32``: torch's ``cholesky_ex`` / ``cholesky_inverse`` (MKL), float32;
* ``f64``: the library's route on a float64 copy (torch's route in float64 gives the same ΔPPL);
* ``damp+0.1%``: the library's route with the dampening 0.1% larger (0.01001 instead of 0.01).

    python bench/gptq_roundoff.py --recipe gptq-w4-g64 --jobs 2 --out bench/results/gptq_roundoff
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import torch

VARIANTS = ("lapack-f32", "torch-f32", "f64", "damp+0.1%")
HERE = Path(__file__).resolve().parent


def patch(variant: str) -> None:
    """Swap GPTQ's inverse Cholesky for ``variant`` (in this process only)."""
    import modelpress.calib.obs as obs
    import modelpress.quant.algos.gptq.gptq as gptq

    lib = obs.inverse_cholesky_

    def torch_f32(Hw: torch.Tensor, percdamp: float, warnings: list[str], who: str = "gptq"):
        base, backup = Hw.diagonal().clone(), Hw.clone()
        for _ in range(obs.MAX_DAMP_RETRIES + 1):
            Hw.diagonal().copy_(base + percdamp * base.mean())
            if obs.torch_upper_chol_of_inverse_(Hw):
                return Hw, percdamp
            Hw.copy_(backup)
            percdamp *= 10
        raise RuntimeError("not positive definite")

    def f64(Hw: torch.Tensor, percdamp: float, warnings: list[str], who: str = "gptq"):
        H64, used = lib(Hw.double(), percdamp, warnings, who)
        return Hw.copy_(H64), used

    def damp(Hw: torch.Tensor, percdamp: float, warnings: list[str], who: str = "gptq"):
        return lib(Hw, percdamp * 1.001, warnings, who)

    gptq.inverse_cholesky_ = {"lapack-f32": lib, "torch-f32": torch_f32, "f64": f64, "damp+0.1%": damp}[variant]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="gptq-w4-g64")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--jobs", type=int, default=2, help="variants run at once (1 thread each)")
    ap.add_argument("--out", required=True, help="folder: one quant_table JSON/MD per variant plus summary.md")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.child:  # one variant: patch, then run quant_table in this process
        patch(args.child)
        sys.argv = [str(HERE / "quant_table.py"), *rest, "--out", args.child_out]
        runpy.run_path(str(HERE / "quant_table.py"), run_name="__main__")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    todo = list(args.variants)
    while todo:
        batch, todo = todo[: args.jobs], todo[args.jobs:]
        procs = [subprocess.Popen([sys.executable, __file__, "--out", str(out), "--child", v, "--threads", "1",
                                   "--eval-tokens", "8192", "--eval-seq-len", "1024", "--recipes", args.recipe,
                                   "--child-out", str(out / _slug(v))], env=env) for v in batch]
        if any(p.wait() for p in procs):
            return 1
    summarize(out, args.recipe)
    return 0


def _slug(v: str) -> str:
    return v.replace("+", "plus").replace("%", "pct").replace(".", "_")


def summarize(out: Path, recipe: str) -> None:
    lines = [f"# {recipe} on SmolLM2-135M: ΔPPL when only the inverse Cholesky's rounding changes", "",
             "WikiText-2 first 8192 tokens, 1024-token windows, calibration 64 x 512 C4 tokens, 1 thread each "
             "(`python bench/gptq_roundoff.py`).", "", "| variant | PPL | ΔPPL | compress s |", "|---|---|---|---|"]
    for v in VARIANTS:
        p = out / f"{_slug(v)}.json"
        if not p.exists():
            continue
        row = next(r for r in json.loads(p.read_text())["rows"] if r["recipe"] == recipe)
        lines.append(f"| {v} | {row['perplexity']:.3f} | {row['delta_ppl_pct']:+.2f}% | {row['compress_s']:.0f} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
