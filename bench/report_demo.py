"""Real inputs for ``modelpress report``, the report itself and a headless-Chromium screenshot of it.

SmolLM2-135M-Instruct (the bundled Q4_1 GGUF, loaded as fp32) at fp32, rtn-w8, rtn-w4-g64 and gptq-w3-g64
(calibration 32 x 256 C4 tokens), each saved (size on disk is the saved files': fp32 safetensors for
the float model), then evaluated the way ``modelpress eval`` does:
perplexity on the first WikiText-2 tokens, HellaSwag and BLiMP subsets (converted by
``bench/eval_tasks.py``'s converters) with the fp32 model as the baseline (flips, slices), next-token
KL, a small behaviour suite, and decode latency / peak RSS / cost measured in a fresh process per
model (``modelpress.eval.perf``). Then a small ``modelpress search`` on the same model, and one
``modelpress report`` over everything; Chromium screenshots the HTML.

Each model's files are kept in ``OUT/`` (JSON), so a rerun only redoes what is missing
(``--redo`` forces it). One thread: CPU seconds are what it cost on a shared machine.

    nice -n 19 python bench/report_demo.py --threads 1
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_tasks import PARADIGMS, SHARED, convert_blimp, convert_hellaswag  # noqa: E402

MODEL = "bundled:smollm2-135m-instruct"
RECIPES = ["rtn-w8", "rtn-w4-g64", "gptq-w3-g64"]
BEHAVIOUR = """
- {id: capital, prompt: "What is the capital of France?", chat: true, max_new_tokens: 24,
   expect: {contains: [Paris], same_as_baseline: true}}
- {id: arithmetic, prompt: "What is 12 plus 7? Answer with a number.", chat: true, max_new_tokens: 16,
   expect: {contains: ["19"]}}
- {id: json, prompt: "Reply only with a JSON object with a key \\"ok\\" set to true.", chat: true,
   max_new_tokens: 24, expect: {valid_json: true}}
- {id: colour, prompt: "Name the colour of a clear daytime sky in one word.", chat: true, max_new_tokens: 12,
   expect: {contains: [blue], max_chars: 200}}
"""
SPACE = """name: smollm2-quant
params:
  method: {choices: [rtn, gptq]}
  bits: {choices: [3, 4, 8]}
  group: {choices: [64, 128]}
  sparsity: {low: 0.0, high: 0.5, step: 0.25}
stages:
  - {method: magnitude, when: sparsity, ignore: [lm_head], pattern: unstructured, sparsity: $sparsity}
  - {method: $method, ignore: [lm_head], format: {type: int, bits: $bits, granularity: $group}}
"""


def prepare(out: Path, args: argparse.Namespace) -> dict[str, Path]:
    """Task files and the behaviour suite (written into OUT so the report's inputs are all there)."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"hellaswag": out / "hellaswag.jsonl", "blimp": out / "blimp.jsonl", "behaviour": out / "behaviour.yaml"}
    convert_hellaswag(SHARED / "hellaswag/hellaswag_val_full.txt.bz2", args.hellaswag_items, files["hellaswag"])
    convert_blimp(SHARED / "blimp/BLiMP.zip", PARADIGMS[:3], args.blimp_items, files["blimp"])
    files["behaviour"].write_text(BEHAVIOUR)
    return files


def compress_variant(base, recipe: str, folder: Path, args: argparse.Namespace):
    """A compressed, saved copy of ``base``; its compress report goes to OUT/<recipe>.compress.json."""
    import modelpress as mp
    from modelpress import api

    lm = dataclasses.replace(base, module=copy.deepcopy(base.module), layer_formats={})
    calib = mp.calibration_for(base, "bundled:c4", args.calib_samples, args.calib_seq_len) if api.needs_calibration(recipe) else None
    rep = mp.compress(lm, recipe, calib=calib, progress=False)
    path = mp.save(lm, folder / recipe, recipe=recipe, report=rep, overwrite=True)
    return lm, path, json.loads((path / "report.json").read_text())


def evaluate(lm, size_path: Path | None, base, files: dict[str, Path], args: argparse.Namespace) -> dict:
    """What ``modelpress eval --data ... --task ... --behaviour ... [--baseline fp32]`` writes."""
    import modelpress as mp
    from modelpress.eval.report import delta_pct
    from modelpress.eval.suite import EvalPlan, evaluate_beyond_ppl

    kw = dict(seq_len=args.seq_len, max_tokens=args.eval_tokens, progress=False)
    res = mp.evaluate(lm, "bundled:wikitext2", size_path=size_path, **kw)
    if base is not None:
        res["baseline"] = mp.evaluate(base, "bundled:wikitext2", **kw)
        res["delta_ppl_pct"] = delta_pct(res["perplexity"], res["baseline"]["perplexity"])
    plan = EvalPlan(tasks=(str(files["hellaswag"]), str(files["blimp"])), behaviour=str(files["behaviour"]),
                    agreement_tokens=args.agreement_tokens, seq_len=args.seq_len)
    c0 = time.process_time()
    res.update(evaluate_beyond_ppl(lm, plan, base))
    res["tasks_cpu_s"] = time.process_time() - c0
    return res


def perf(model: str, args: argparse.Namespace, bandwidth: float) -> dict:
    from modelpress.eval.perf import measure_in_subprocess

    return measure_in_subprocess(model=model, threads=args.threads, batches=(1,), prompt_len=64, new_tokens=32,
                                 bandwidth=bandwidth, price_per_hour=args.price_per_hour)


def run_models(out: Path, files: dict[str, Path], args: argparse.Namespace) -> None:
    import modelpress as mp
    from modelpress.eval.perf import measure_bandwidth

    work = Path(tempfile.mkdtemp(prefix="mp-report-demo-"))
    base = mp.load(MODEL)
    bw = measure_bandwidth(1 << 27)["read_bytes_per_s"]
    for label in ["fp32", *RECIPES]:
        ev_path = out / f"{label}.eval.json"
        if ev_path.exists() and not args.redo:
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        if label == "fp32":  # saved too: its size is the fp32 safetensors' (the bundled file is a Q4_1 GGUF)
            lm, path = base, mp.save(base, work / "fp32", overwrite=True)
        else:
            lm, path, rep = compress_variant(base, label, work, args)
            (out / f"{label}.compress.json").write_text(json.dumps(rep, indent=1, default=str))
        ev = evaluate(lm, path, None if label == "fp32" else base, files, args)
        ev["model"] = label
        (out / f"{label}.perf.json").write_text(json.dumps(perf(str(path), args, bw), indent=1, default=str))
        ev["wall_s"], ev["cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
        ev["load_avg_1min"] = os.getloadavg()[0]
        ev_path.write_text(json.dumps(ev, indent=1, default=str))
        print(f"{label}: perplexity {ev['perplexity']:.3f}, {ev['cpu_s']:.0f} CPU s", file=sys.stderr, flush=True)
    shutil.rmtree(work, ignore_errors=True)


def run_search(out: Path, args: argparse.Namespace) -> None:
    (out / "space.yaml").write_text(SPACE)
    db = out / "search" / "study.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "modelpress.cli.main", "--quiet", "search", "--model", MODEL, "--space",
           str(out / "space.yaml"), "--trials", str(args.trials), "--storage", f"sqlite:///{db}", "--study", "smollm2",
           "--out", str(out / "search"), "--calib-samples", "16", "--calib-seq-len", "256", "--eval-max-tokens",
           str(args.search_eval_tokens), "--eval-seq-len", "512", "--threads", str(args.threads), "--seed", "0"]
    subprocess.run(cmd, check=True)


def run_report(out: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    html, md = Path(args.html), Path(args.html).with_suffix(".md")
    inputs = []
    for label in ["fp32", *RECIPES]:
        inputs += [f"{label}={out / f'{label}.{kind}.json'}" for kind in ("eval", "compress", "perf")
                   if (out / f"{label}.{kind}.json").exists()]
    if (out / "search" / "search.json").exists():
        inputs.append(str(out / "search"))
    subprocess.run([sys.executable, "-m", "modelpress.cli.main", "report", "--inputs", *inputs, "--baseline", "fp32",
                    "--price-per-hour", str(args.price_per_hour), "--title",
                    "SmolLM2-135M-Instruct: what each compression kept", "--note", note(args),
                    "--html", str(html), "--markdown", str(md)],
                   check=True)
    return html, md


def note(args: argparse.Namespace) -> str:
    return (f"SmolLM2-135M-Instruct (the bundled Q4_1 GGUF, loaded as fp32). Perplexity: first {args.eval_tokens} "
            f"WikiText-2 tokens in {args.seq_len}-token windows; HellaSwag first {args.hellaswag_items} items, BLiMP 3 "
            f"paradigms x {args.blimp_items} pairs, all against fp32. {args.threads} thread on a shared 2-core CPU box "
            "(other jobs ran beside it, the 1-minute load average was 8-11 during the runs): latency and throughput "
            "are noisy; perplexity, accuracy and sizes are not. Cost at an assumed "
            f"{args.price_per_hour} per machine-hour.")


def screenshot(html: Path, png: Path, height: int = 4400) -> None:
    """Chromium (Debian package) renders the file with no network and saves a PNG (tall enough for
    the whole report)."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        raise SystemExit("chromium not found: apt-get install -y chromium")
    subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--screenshot={png}",
                    f"--window-size=1400,{height}", f"file://{html.resolve()}"], check=True, capture_output=True, timeout=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/report_demo", help="folder for every model's JSON")
    ap.add_argument("--html", default="bench/results/report_demo.html")
    ap.add_argument("--hellaswag-items", type=int, default=80)
    ap.add_argument("--blimp-items", type=int, default=40, help="pairs per BLiMP paradigm (3 paradigms)")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--agreement-tokens", type=int, default=2048)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--trials", type=int, default=6, help="search trials (0: no search)")
    ap.add_argument("--search-eval-tokens", type=int, default=2048)
    ap.add_argument("--price-per-hour", type=float, default=0.10, help="machine price per hour for cost per token")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--redo", action="store_true")
    ap.add_argument("--only", choices=["models", "search", "report"], help="run one phase only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MODELPRESS_PROGRESS", "0")
    out = Path(args.out)
    files = prepare(out, args)
    if args.only in (None, "models"):
        run_models(out, files, args)
    if args.only in (None, "search") and args.trials:
        run_search(out, args)
    if args.only in (None, "report"):
        html, _ = run_report(out, args)
        screenshot(html, html.with_suffix(".png"))
        print(f"wrote {html}, {html.with_suffix('.md')} and {html.with_suffix('.png')}", file=sys.stderr)


if __name__ == "__main__":
    main()
