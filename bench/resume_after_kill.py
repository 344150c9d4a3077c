"""SIGKILL a GPTQ run mid-way, rerun the same command, and check the result is bit-identical.

    python bench/resume_after_kill.py --out bench/results/resume_after_kill
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("MODELPRESS_SHARED", HERE.parents[1] / "shared")) / "data"


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def weights_digest(folder: Path) -> dict[str, str]:
    return {p.name: sha(p) for p in sorted(folder.glob("*.safetensors"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="bundled:smollm2-135m-instruct")
    ap.add_argument("--recipe", default="gptq-w4-g64")
    ap.add_argument("--calib", default=str(SHARED / "c4/c4_en_train_first1000.jsonl"))
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--kill-at-block", type=int, default=10)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mp-resume-"))
    env = {**os.environ, "MODELPRESS_PROGRESS": "0", "OMP_NUM_THREADS": "1"}

    def cmd(out: Path) -> list[str]:
        return [sys.executable, "-m", "modelpress.cli.main", "--quiet", "compress", "--model", args.model,
                "--recipe", args.recipe, "--calib", args.calib, "--calib-samples", str(args.samples),
                "--calib-seq-len", str(args.seq_len), "--output", str(out)]

    t = time.perf_counter()
    subprocess.run(cmd(work / "a"), check=True, env=env)
    uninterrupted_s = time.perf_counter() - t
    state = Path(f"{work / 'b'}.work") / "state.json"
    p = subprocess.Popen(cmd(work / "b"), env=env)
    killed_at = None
    while p.poll() is None:
        if state.exists():
            try:
                nb = json.loads(state.read_text())["next_block"]
            except (json.JSONDecodeError, KeyError):
                nb = 0
            if nb >= args.kill_at_block:
                os.kill(p.pid, signal.SIGKILL)
                killed_at = nb
                break
        time.sleep(0.2)
    p.wait()
    t = time.perf_counter()
    r = subprocess.run(cmd(work / "b"), env=env, capture_output=True, text=True)
    resumed_s = time.perf_counter() - t
    resumed_msg = "resumed from checkpoint" in (r.stderr + (work / "b/report.json").read_text() if r.returncode == 0 else r.stderr)
    a, b = weights_digest(work / "a"), weights_digest(work / "b")
    res = {"killed_after_blocks": killed_at, "rerun_exit": r.returncode, "resumed": resumed_msg,
           "bit_identical": a == b, "digest": a, "uninterrupted_s": uninterrupted_s, "resumed_rerun_s": resumed_s,
           "recipe": args.recipe, "model": args.model, "calib": [args.samples, args.seq_len]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(res, indent=2))
    md = ["# SIGKILL mid-run, then rerun the same command", "",
          "| recipe | killed after block | resumed | weights bit-identical | uninterrupted s | rerun s |",
          "|---|---|---|---|---|---|",
          f"| {args.recipe} | {killed_at} | {resumed_msg} | {a == b} | {uninterrupted_s:.0f} | {resumed_s:.0f} |"]
    Path(args.out + ".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    sys.exit(0 if a == b and killed_at is not None else 1)


if __name__ == "__main__":
    main()
