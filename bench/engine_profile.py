"""Where a `modelpress compress` run spends its time and memory, measured inside one process.

Runs the CLI's compress in-process with timers wrapped around the engine's parts and reports:

* seconds (wall and process CPU, exclusive of nested parts) per part: model load, calibration
  tokens, first-block capture, block forwards, Hessian / statistics products, the inverse
  Cholesky, GPTQ's / SparseGPT's column loop, installing layers, checkpoints, saving;
* block-forward counts: how much of each block the calibration set goes through, per block, as
  multiply-adds relative to one full block forward (the linears' tokens x in x out plus the
  attention core), and how often attention and MLP are computed;
* resident memory: right after imports, after loading, the peak, and which part it was reached in
  (sampled every 20 ms from /proc/self/statm).

    python bench/engine_profile.py --recipe gptq-w4-g64 --threads 2 --out /tmp/prof
    python bench/engine_profile.py --recipe gptq-w4-g64 --eval --out bench/results/engine_profile_gptq
    python bench/engine_profile.py --recipe gptq-w4-g64 --threads 2 --as-safetensors --extra=--low-memory \
        --eval --out bench/results/engine_profile_low_memory

``--eval`` also measures the output's perplexity on the first 8,192 WikiText-2 tokens (1,024-token
windows, not timed) against the float model's 29.511.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("MODELPRESS_SHARED", ROOT.parent / "shared")) / "data"
BASE_PPL = 29.511  # SmolLM2-135M-Instruct fp32, first 8,192 WikiText-2 tokens, 1,024-token windows
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class Sections:
    """Exclusive wall / CPU seconds per named part (a nested part's time is not its parent's)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.stack: list[list[Any]] = []  # [name, wall0, cpu0, child_wall, child_cpu]
        self.peak = (0, "start")

    def current(self) -> str:
        return self.stack[-1][0] if self.stack else "other"

    def wrap(self, name: str, fn: Callable) -> Callable:
        def inner(*a: Any, **kw: Any) -> Any:
            self.stack.append([name, time.perf_counter(), time.process_time(), 0.0, 0.0])
            try:
                return fn(*a, **kw)
            finally:
                n, w0, c0, cw, cc = self.stack.pop()
                w, c = time.perf_counter() - w0, time.process_time() - c0
                self.wall[n] += w - cw
                self.cpu[n] += c - cc
                self.calls[n] += 1
                if self.stack:
                    self.stack[-1][3] += w
                    self.stack[-1][4] += c
        inner.__wrapped__ = fn
        return inner

    def patch(self, obj: Any, attr: str, name: str) -> None:
        setattr(obj, attr, self.wrap(name, getattr(obj, attr)))

    def sample_rss(self, stop: threading.Event) -> None:
        while not stop.wait(0.02):
            r = rss_now()
            if r > self.peak[0]:
                self.peak = (r, self.current())


class Counter:
    """Multiply-adds that the calibration set costs in the decoder blocks, by a global forward hook.

    Global, because compressed layers replace the float ones mid-block: a hook on the old module
    would stop counting.
    """

    def __init__(self) -> None:
        self.macs = 0.0
        self.attn_tokens = 0
        self.mlp_tokens = 0
        self.block_macs = 0.0  # one full forward of every block over the calibration set
        self.roles: dict[int, tuple[str, int]] = {}  # id(linear) -> (name, in * out)

    def install(self, lm: Any, n_tokens: int, seq: int) -> None:
        import torch.nn.modules.module as M

        from modelpress.models.archspec import blocks_path, get_blocks

        self.lm, self.prefix = lm, blocks_path(lm.module, lm.spec) + "."
        blocks = get_blocks(lm.module, lm.spec)
        cfg = lm.module.config
        heads = cfg.num_attention_heads
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        self.core = 2 * seq * heads * hd  # QK^T and AV per token (full, not causal-halved)
        self.n_blocks, self.n_tokens = len(blocks), n_tokens
        self._refresh()
        self.block_macs = float(n_tokens) * sum(k for _, k in self.roles.values()) + n_tokens * self.core * len(blocks)
        # after the forward, not before: a pass that stops before a layer (its pre-hook raises once the
        # capture hooks have seen the input) does not run that layer and must not count it
        M.register_module_forward_hook(self._hook)

    def _refresh(self) -> None:
        self.roles = {id(m): (n, m.in_features * m.out_features) for n, m in self.lm.module.named_modules()
                      if n.startswith(self.prefix) and hasattr(m, "in_features") and hasattr(m, "out_features")}
        self.known = {id(m) for m in self.lm.module.modules()}

    def _hook(self, m: Any, args: tuple, _out: Any = None) -> None:
        if id(m) not in self.known:
            self._refresh()
        if id(m) not in self.roles or not args or not hasattr(args[0], "shape"):
            return
        name, k = self.roles[id(m)]
        t = args[0].numel() // args[0].shape[-1]
        self.macs += t * k
        if name.endswith("o_proj"):
            self.attn_tokens += t
            self.macs += t * self.core
        elif name.endswith("down_proj"):
            self.mlp_tokens += t

    def summary(self) -> dict[str, float]:
        per = self.n_blocks * self.n_tokens
        return {"block_forward_equivalents_per_block": self.macs / self.block_macs,
                "attention_computations_per_block": self.attn_tokens / per,
                "mlp_computations_per_block": self.mlp_tokens / per}


def instrument(sec: Sections, counter: Counter, calib_shape: list[int]) -> None:
    import modelpress.api as api
    import modelpress.calib.blocks as blocks
    import modelpress.calib.stats as stats
    import modelpress.models.loading as loading
    import modelpress.pipeline.runner as runner
    import modelpress.pipeline.sequential as seq

    sec.patch(loading, "load_model", "load")
    sec.patch(api, "load_model", "load")
    sec.patch(api, "calibration_for", "calibration tokens")
    sec.patch(api, "save", "save output")
    sec.patch(seq, "capture_first_block_inputs", "capture block-0 inputs")
    for name in ("run", "propagate", "outputs"):
        sec.patch(blocks.BlockInputs, name, "block forwards")
    sec.patch(blocks.SubInputs, "run", "block forwards")
    for cls in ("HessianAccumulator", "ActStatsAccumulator"):
        if hasattr(stats, cls):
            sec.patch(getattr(stats, cls), "update", "statistics (X^T X, |x|)")
    sec.patch(seq.Checkpointer, "save", "checkpoints")
    _patch_algorithms(sec)
    apply = runner.Runner.apply

    def counted_apply(self: Any) -> Any:
        counter.install(self.lm, calib_shape[0] * calib_shape[1], calib_shape[1])
        return apply(self)
    runner.Runner.apply = counted_apply


def _patch_algorithms(sec: Sections) -> None:
    import modelpress.calib.obs as obs
    import modelpress.quant.apply as qapply
    import modelpress.quant.algos.gptq.gptq as gptq
    import modelpress.quant.algos.gptq.method as gmethod

    for mod in (gptq, obs):
        if hasattr(mod, "inverse_cholesky_"):
            sec.patch(mod, "inverse_cholesky_", "inverse Cholesky")
    sec.patch(gmethod, "gptq_quantize", "GPTQ column loop")
    for mod in (gmethod, qapply):
        sec.patch(mod, "install_quantized", "install / record layers")
        sec.patch(mod, "record_quantized", "install / record layers")
    try:
        import modelpress.sparsity.algos.sparsegpt.method as smethod
        sec.patch(smethod, "sparsegpt_prune", "SparseGPT column loop")
    except (ImportError, AttributeError):
        pass
    try:
        import modelpress.quant.algos.awq.method as amethod
        for fn in ("search_scales", "search_clip", "_search_scale", "_search_clip"):
            if hasattr(amethod, fn):
                sec.patch(amethod, fn, f"AWQ {fn.strip('_')}")
    except ImportError:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bundled:smollm2-135m-instruct")
    ap.add_argument("--recipe", default="gptq-w4-g64")
    ap.add_argument("--calib", default=str(SHARED / "c4/c4_en_train_first1000.jsonl"))
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--eval", action="store_true", help="also measure the output's perplexity (not timed)")
    ap.add_argument("--extra", action="extend", nargs="*", default=[],
                    help="more compress arguments, repeatable (e.g. --extra=--low-memory --extra=--matmul-precision=bf16)")
    ap.add_argument("--as-safetensors", action="store_true",
                    help="first write --model as an fp32 safetensors folder (in a child process, not timed) and "
                         "compress that: what --low-memory needs")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    fp32_bytes = None
    if args.as_safetensors:
        folder = Path(tempfile.mkdtemp(prefix="mp-prof-fp32-")) / "model"
        import subprocess

        subprocess.run([sys.executable, "-c", "import sys, modelpress as mp\n"
                        "lm = mp.load(sys.argv[1]); lm.module.save_pretrained(sys.argv[2]); lm.tokenizer.save(sys.argv[2])",
                        args.model, str(folder)], check=True)
        args.model = str(folder)
        fp32_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    os.environ["MODELPRESS_PROGRESS"] = "0"
    t_start, c_start = time.perf_counter(), time.process_time()
    import torch
    import transformers  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401  (what the load imports anyway)

    import modelpress.cli.main as cli
    if args.threads:
        torch.set_num_threads(args.threads)
    rss_imports = rss_now()
    sec, counter = Sections(), Counter()
    instrument(sec, counter, [args.calib_samples, args.calib_seq_len])
    stop = threading.Event()
    sampler = threading.Thread(target=sec.sample_rss, args=(stop,), daemon=True)
    sampler.start()
    work = Path(tempfile.mkdtemp(prefix="mp-prof-"))
    out = work / "out"
    t0, c0 = time.perf_counter(), time.process_time()
    rc = cli.main(["--quiet", "compress", "--model", args.model, "--recipe", args.recipe, "--calib", args.calib,
                   "--calib-samples", str(args.calib_samples), "--calib-seq-len", str(args.calib_seq_len),
                   "--output", str(out), *args.extra])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    stop.set()
    sampler.join()
    if rc != 0:
        sys.exit(rc)
    res = {"recipe": args.recipe, "model": args.model, "threads": torch.get_num_threads(), "extra": args.extra,
           "compress_command_wall_s": wall, "compress_command_cpu_s": cpu,
           "imports_wall_s": t0 - t_start, "imports_cpu_s": c0 - c_start,
           "parts": {k: {"wall_s": round(sec.wall[k], 3), "cpu_s": round(sec.cpu[k], 3), "calls": sec.calls[k]}
                     for k in sorted(sec.wall, key=lambda k: -sec.wall[k])},
           "other_wall_s": wall - sum(sec.wall.values()), "other_cpu_s": cpu - sum(sec.cpu.values()),
           **counter.summary(),
           "rss_after_imports_bytes": rss_imports,
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "peak_rss_sampled_bytes": sec.peak[0], "peak_rss_part": sec.peak[1],
           "fp32_safetensors_bytes": fp32_bytes,
           "peak_rss_over_fp32": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / fp32_bytes
                                  if fp32_bytes else None),
           "load_average_1min": os.getloadavg()[0]}
    report = json.loads((out / "report.json").read_text())
    res["report_compress_s"], res["report_load_s"] = report.get("compress_s"), report.get("load_s")
    if args.eval:
        res.update(evaluate(out))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


def evaluate(out: Path) -> dict[str, float]:
    import modelpress as mp
    from modelpress.data.sources import read_text
    from modelpress.eval.perplexity import perplexity
    from modelpress.quant.qlinear import cached_dequant

    lm = mp.load(str(out))
    ids = lm.tokenizer.encode(read_text(SHARED / "wikitext2/wiki.test.raw", True))[:8192]
    with cached_dequant():
        ppl = perplexity(lm.module, ids, 1024).perplexity
    return {"perplexity": ppl, "delta_ppl_pct": 100 * (ppl - BASE_PPL) / BASE_PPL}


if __name__ == "__main__":
    main()
