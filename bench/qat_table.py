"""QAT (EfficientQAT: Block-AP then E2E-QP) beside RTN and GPTQ on one model, one run: PPL, ΔPPL,
bits/weight, training tokens, wall and CPU seconds.

Loads the model once and evaluates the float baseline; for each bit width: RTN and GPTQ (built-ins
or the same recipe at that width), then Block-AP alone (evaluated), then E2E-QP on the Block-AP
model (evaluated again): the two QAT rows are the two halves of the ``qat-wN-g64`` recipe, with
E2E-QP's teacher the float model (a reference snapshot of it). CPU seconds are reported beside wall
seconds: with ``--threads 1`` they are what the job itself cost on a shared machine.

Default budget: the built-in recipe's. ``--block-samples`` / ``--block-epochs`` / ``--e2e-steps``
override it, as do ``--block-weight-lr`` / ``--block-quant-lr`` for Block-AP's learning rates (an
overridden budget, labelled as such in the table).

    python bench/qat_table.py --threads 1 --out bench/results/qat_table
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _compress_setup import float_model_and_eval  # noqa: E402

#: (argument, stage: 0 Block-AP / 1 E2E-QP, key in that stage (dots: nested), label in the table's header):
#: the recipe settings the command line may override
OVERRIDES = [("block_samples", 0, "samples", "Block-AP samples"), ("block_epochs", 0, "epochs", "epochs"),
             ("block_weight_lr", 0, "weight_lr", "weight_lr"), ("block_quant_lr", 0, "quant_lr", "quant_lr"),
             ("block_weight_lr_max_step", 0, "weight_lr_max_step", "weight_lr_max_step"),
             ("block_norm_lr", 0, "norm_lr", "norm_lr"), ("e2e_steps", 1, "train.steps", "E2E-QP steps"),
             ("e2e_lr", 1, "train.lr", "E2E-QP lr")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bundled:smollm2-135m-instruct")
    ap.add_argument("--bits", nargs="+", type=int, default=[3, 2])
    ap.add_argument("--w8a8", action="store_true",
                    help="instead of --bits: int8-static, int8-dynamic and smoothquant-w8a8 beside qat-w8a8 (W8A8 QAT)")
    ap.add_argument("--eval-data", default="/work/shared/data/wikitext2/wiki.test.raw")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--eval-seq-len", type=int, default=1024)
    ap.add_argument("--calib", default="bundled:c4")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--train-samples", type=int, default=256, help="E2E-QP training sequences (bundled C4)")
    ap.add_argument("--train-seq-len", type=int, default=256)
    ap.add_argument("--block-samples", type=int, default=None, help="override the recipe's Block-AP samples")
    ap.add_argument("--block-epochs", type=int, default=None, help="override the recipe's Block-AP epochs")
    ap.add_argument("--e2e-steps", type=int, default=None, help="override the recipe's E2E-QP steps")
    ap.add_argument("--block-weight-lr", type=float, default=None, help="override the recipe's Block-AP weight_lr")
    ap.add_argument("--block-quant-lr", type=float, default=None, help="override the recipe's Block-AP quant_lr")
    ap.add_argument("--block-weight-lr-max-step", type=float, default=None,
                    help="override the recipe's Block-AP weight_lr_max_step (cap: this fraction of a layer's mean step)")
    ap.add_argument("--block-norm-lr", type=float, default=None, help="Block-AP also trains the norm gains at this lr")
    ap.add_argument("--e2e-lr", type=float, default=None, help="override the recipe's E2E-QP lr")
    ap.add_argument("--block-ap-state", default=None,
                    help="a file: the Block-AP model is saved there, or loaded from it when it exists (E2E-QP "
                         "variants on one Block-AP run; one bit width)")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--start", choices=["float", "gptq"], default="float",
                    help="Block-AP's start: the float layers (the recipe: RTN grid, float weight trained through it) "
                         "or a GPTQ stage in the recipe's own format first (QAT from a PTQ start)")
    ap.add_argument("--skip-ptq", action="store_true", help="no RTN / GPTQ rows (e.g. a second start on the same settings)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--matmul-precision", choices=["fp32", "bf16"], default="fp32",
                    help="every row's compress and the E2E-QP training (modelpress's --matmul-precision)")
    ap.add_argument("--out", required=True, help="output path without extension (.json and .md are written)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MODELPRESS_PROGRESS", "0")
    import modelpress as mp
    from modelpress.api import training_for

    base_lm, calib, ppl, fresh = float_model_and_eval(args)
    train = training_for(base_lm, args.calib, args.train_samples, args.train_seq_len, seed=1)
    reduced = any(getattr(args, a) is not None for a, *_ in OVERRIDES)

    meta = {**{k: getattr(args, k) for k in ("model", "eval_data", "eval_tokens", "eval_seq_len", "calib", "calib_samples",
                                              "calib_seq_len", "train_samples", "train_seq_len", "threads",
                                              "block_ap_state", "start", "matmul_precision", *(a for a, *_ in OVERRIDES))},
            "budget": "overridden" if reduced else "recipe default",
            "torch": torch.__version__, "machine": os.uname().nodename, "cpus": os.cpu_count()}
    base = ppl(base_lm.module)
    rows = [{"recipe": "baseline (fp32)", "perplexity": base, "delta_ppl_pct": 0.0, "bits_per_weight": 32.0}]

    def add(name: str, lm, rep: dict, wall: float, cpu: float, tokens: str, load: tuple[float, float]) -> None:
        p = ppl(lm.module)
        rows.append({"recipe": name, "perplexity": p, "delta_ppl_pct": 100 * (p - base) / base,
                     "bits_per_weight": rep.get("mean_bits_per_weight"), "compress_s": wall, "compress_cpu_s": cpu,
                     "train_tokens": tokens, "peak_rss_gib": rep.get("peak_rss_bytes", 0) / 2**30,
                     "load_avg_1min": list(load)})
        print(json.dumps(rows[-1]), flush=True)
        write(args.out, meta, rows)  # after every row: a stopped run keeps what it measured

    for bits in ["w8a8"] if args.w8a8 else args.bits:
        ptq = ("int8-static", "int8-dynamic", "smoothquant-w8a8") if bits == "w8a8" else \
            [f"{method}-w{bits}-g64" for method in ("rtn", "gptq")]
        for name in () if args.skip_ptq else ptq:
            recipe = name if name in mp_builtins() else {"name": name, "stages": [_ptq_stage(name.split("-")[0], bits)]}
            lm, l0 = fresh(), os.getloadavg()[0]
            rep = mp.compress(lm, recipe, calib=calib, progress=False,
                          matmul_precision=args.matmul_precision)
            add(name, lm, rep, rep["compress_s"], rep["compress_cpu_s"], "0", (l0, os.getloadavg()[0]))
        qat = "qat-w8a8" if bits == "w8a8" else f"qat-w{bits}-g64"
        stages = load_qat(qat, args)
        lm, l0 = fresh(), os.getloadavg()[0]
        first = [{**_ptq_stage("gptq", bits), "format": stages[0]["format"]}] if args.start == "gptq" else []
        saved = Path(args.block_ap_state) if args.block_ap_state else None
        loaded = saved is not None and saved.exists()
        if loaded:  # the same Block-AP model, from an earlier run
            kept = torch.load(saved, weights_only=False)
            lm.module, rep = kept["module"], kept["report"]
        else:
            rep = mp.compress(lm, {"name": f"{qat} block-ap", "stages": first + [stages[0]]}, calib=calib,
                              progress=False, matmul_precision=args.matmul_precision)
            if saved is not None:
                torch.save({"module": lm.module, "report": rep, "stage": stages[0]}, saved)
        blocks = [m for s in rep["stages"] for m in s["metrics"] if m.get("stage") == "block-ap"]
        per_block = blocks[0]["tokens"] if blocks else 0
        start = (" from GPTQ" if args.start == "gptq" else "") + (" (loaded)" if loaded else "")
        add(f"{qat}: Block-AP{start}{' (budget overridden)' if reduced else ''}", lm, rep, rep["compress_s"], rep["compress_cpu_s"],
            f"{per_block:,} per block x {len(blocks)}", (l0, os.getloadavg()[0]))
        if args.skip_e2e:
            continue
        l0, t0, c0 = os.getloadavg()[0], time.perf_counter(), time.process_time()
        result = e2e(base_lm, lm, stages[1], train, args.matmul_precision)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        rep2 = {"mean_bits_per_weight": rep["mean_bits_per_weight"], "peak_rss_bytes": _peak()}
        add(f"{qat}: Block-AP{start} + E2E-QP{' (budget overridden)' if reduced else ''}", lm, rep2,
            rep["compress_s"] + wall, rep["compress_cpu_s"] + cpu,
            f"{per_block:,} per block x {len(blocks)} + {result['tokens']:,} end to end", (l0, os.getloadavg()[0]))


def mp_builtins() -> set[str]:
    from modelpress.pipeline.recipe import builtin_recipes

    return set(builtin_recipes())


def _ptq_stage(method: str, bits: int) -> dict:
    stage = {"method": method, "ignore": ["lm_head"], "format": {"type": "int", "bits": bits, "symmetric": True,
                                                                "granularity": 64}}
    if method == "gptq":
        stage.update(act_order=True, true_sequential=True, dampening_frac=0.01)
    return stage


def load_qat(name: str, args: argparse.Namespace) -> list[dict]:
    """The QAT recipe's two stages (Block-AP, E2E-QP) as dicts, with the budget overrides applied."""
    from modelpress.pipeline.recipe import load_recipe

    stages = [s.to_dict() for s in load_recipe(name).stages]
    for arg, index, key, _ in OVERRIDES:
        if getattr(args, arg) is not None:
            *parents, last = key.split(".")
            target = stages[index]
            for k in parents:
                target = target[k]
            target[last] = getattr(args, arg)
    return stages


def e2e(float_lm, lm, stage: dict, train, precision: str = "fp32") -> dict:
    """E2E-QP on ``lm`` with the float model as teacher (the recipe's second stage, run on its own)."""
    from modelpress.core.method import StageContext
    from modelpress.core.threads import matmul_precision
    from modelpress.pipeline.recipe import parse_recipe
    from modelpress.pipeline.reference import FloatReference
    from modelpress.quant.algos.qat.e2e import run_e2e_qp

    cfg = parse_recipe({"stages": [stage]}).stages[0]
    with tempfile.TemporaryDirectory() as d:
        ref = FloatReference.snapshot(float_lm, d)
        ctx = StageContext(train=train, reference=ref, grad=True)
        try:
            with torch.enable_grad(), matmul_precision(precision):
                run_e2e_qp(lm, cfg, ctx)
        finally:
            ref.close()
    return ctx.metrics[-1]


def _peak() -> int:
    from modelpress.eval.size import peak_rss_bytes

    return peak_rss_bytes()


def write(out: str, meta: dict, rows: list[dict]) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    budget = ("OVERRIDDEN budget: " + ", ".join(f"{label} {meta.get(arg)}" for arg, _, _, label in OVERRIDES) +
              " (None: the recipe's)" if meta["budget"] in ("reduced", "overridden")
              else "the built-in recipes' default budget")
    lines = [f"# {meta['model']}: RTN vs GPTQ vs QAT (EfficientQAT), perplexity on {Path(meta['eval_data']).name}", "",
             f"first {meta['eval_tokens']} tokens, {meta['eval_seq_len']}-token windows; calibration {meta['calib_samples']} x "
             f"{meta['calib_seq_len']} tokens from {meta['calib']} (GPTQ Hessians, Block-AP training); E2E-QP trains on "
             f"{meta['train_samples']} x {meta['train_seq_len']} tokens of {meta['calib']} (another sample); {budget}; "
             f"{meta['threads']} thread(s), matmul precision {meta.get('matmul_precision', 'fp32')}, torch {meta['torch']}, {meta['cpus']} CPUs", "",
             "| recipe | bits/weight | PPL | ΔPPL | training tokens | compress wall s | compress CPU s | peak RSS GiB | load avg (before, after) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = (f"{r['train_tokens']} | {r['compress_s']:.0f} | {r['compress_cpu_s']:.0f} | {r['peak_rss_gib']:.2f} | "
             f"{r['load_avg_1min'][0]:.1f}, {r['load_avg_1min'][1]:.1f}") if "compress_s" in r else "- | - | - | - | -"
        lines.append(f"| {r['recipe']} | {r['bits_per_weight']:.3f} | {r['perplexity']:.3f} | {r['delta_ppl_pct']:+.2f}% | {t} |")
    Path(out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
