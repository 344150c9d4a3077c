"""End-to-end generation on SmolLM2-135M: decode tokens/s, memory and ΔPPL, one run.

Rows (each in its own fresh process, so peak RSS is the row's own; all with the same thread count,
the same prompt and 128 new greedy tokens at batch 1):
  * plain ``transformers`` fp32 ``generate`` (dynamic cache)              - the reference point
  * ours fp32 / bf16 (static KV cache, float weights)
  * ours W8 (rtn-w8, int8pack kernel, bf16 activations)
  * ours W4 (GPTQ W4 g64 from ``--w4`` if that folder exists, else rtn-w4-g64; int4pack, bf16)
  * ours W4 with the LM head in int8 (per channel; the 49k x 576 head is the largest matmul), eager
    and with the decode step through ``torch.compile``; with q/k/v and gate/up fused into one packed
    matmul each (``modelpress.kernels.fuse_projections``)
  * ours W4 with the KV cache in int8 and in FP8 E4M3 (per-head scales calibrated on C4)
  * llama.cpp on the bundled Q4_1 GGUF (``bench/peers/llamacpp.py``; ``bash bench/setup_llamacpp.sh`` once)

ΔPPL: WikiText-2 test, first 8192 tokens, 1024-token windows, scored on what each row runs (our
rows through our runner and its cache). KV rows also give the KL of next-token distributions
against the same model with a float cache over one 2048-token window, and the cache bytes at
the model's full context.

    python bench/e2e_generation.py --threads 2 --out bench/results/e2e_generation
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED = Path(os.environ.get("MODELPRESS_SHARED", ROOT.parent / "shared")) / "data"
PROMPT = "The history of the city begins in the early medieval period, when"


def prepare(args: argparse.Namespace) -> dict[str, str]:
    """Folders for the float model and the compressed ones (written once, reused by later runs)."""
    import modelpress as mp

    out = ROOT / "out"
    paths = {"fp32": out / "smollm2-135m-fp32", "w8": out / "smollm2-rtn-w8"}
    w4 = Path(args.w4)
    paths["w4"] = w4 if w4.exists() else out / "smollm2-rtn-w4-g64"
    if not all(p.exists() for p in paths.values()):
        lm = mp.load(args.model)
        if not paths["fp32"].exists():  # a modelpress folder (the GGUF-loaded model refuses save_pretrained)
            mp.save(lm, paths["fp32"])
        for key, recipe in (("w8", "rtn-w8"), ("w4", "rtn-w4-g64")):
            if not paths[key].exists():
                import copy

                lm2 = mp.load(copy.deepcopy(lm.module))
                lm2.tokenizer, lm2.source = lm.tokenizer, lm.source
                mp.save(lm2, paths[key], recipe=recipe, report=mp.compress(lm2, recipe, progress=False))
    paths["w4_head8"] = Path(str(paths["w4"]) + "-lmhead-w8")
    if not paths["w4_head8"].exists():  # the same W4 weights plus an int8 LM head (the largest single matmul)
        lm = mp.load(str(paths["w4"]))
        rec = {"name": "lm_head-w8", "description": f"rtn int8 per-channel lm_head on top of {paths['w4'].name}",
               "stages": [{"method": "rtn", "targets": ["lm_head"], "ignore": [],
                           "format": {"type": "int", "bits": 8, "granularity": "channel"}}]}
        mp.save(lm, paths["w4_head8"], recipe=rec, report=mp.compress(lm, rec, progress=False))
    return {k: str(v) for k, v in paths.items()}


def _ids(tokenizer: Any, args: argparse.Namespace) -> tuple[torch.Tensor, list[int]]:
    from modelpress.eval.perplexity import read_text

    prompt = torch.tensor([tokenizer.encode(PROMPT)])
    ev = tokenizer.encode(read_text(args.eval_data, True))[: args.eval_tokens]
    return prompt, ev


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def row(kind: str, path: str, dtype: str, kv: str | None, args: argparse.Namespace, tokenizer_src: str,
        compile: bool = False, fuse: bool = False) -> dict[str, Any]:
    """Measure one configuration (runs in a fresh process)."""
    torch.set_num_threads(args.threads)
    os.environ["MODELPRESS_PROGRESS"] = "0"
    import modelpress as mp
    from modelpress.eval.perplexity import perplexity
    from modelpress.eval.size import peak_rss_bytes

    t0 = time.perf_counter()
    lm = mp.load(path)
    tok = lm.tokenizer or mp.load(tokenizer_src).tokenizer
    prompt, ev = _ids(tok, args)
    res: dict[str, Any] = {"kind": kind, "model": path, "dtype": dtype, "kv_cache": kv or dtype,
                           "compiled": compile or args.compile, "fused_projections": fuse}
    if kind == "transformers":
        model = lm.module.eval()
        gen = lambda: _time(lambda: model.generate(prompt, max_new_tokens=args.new_tokens,  # noqa: E731
                                                   min_new_tokens=args.new_tokens, do_sample=False))
        scorer = model
    else:
        from modelpress.eval.perf import RunnerLM
        from modelpress.kernels import cast_float_parts, install_kernels
        from modelpress.kernels.generate import LlamaRunner
        from modelpress.kernels.kvcache import KVCacheQuant

        dt = getattr(torch, dtype)
        if fuse:  # q/k/v and gate/up as one packed matmul each
            from modelpress.kernels import fuse_projections

            res["fused_modules"] = fuse_projections(lm.module)
        plan = install_kernels(lm.module, dtype=dt)
        cast_float_parts(lm.module, dt)
        res["kernels"] = plan.to_dict()
        runner = LlamaRunner(lm.module, max_len=max(args.eval_seq_len, 2048) + 8, compile=compile or args.compile)
        if kv:
            calib = mp.calibration_for(lm, args.calib, 16, 512) if lm.tokenizer else None
            runner.kv_quant = KVCacheQuant.calibrate(runner, calib, kind=kv)
            res.update(_kv_effect(runner, ev, lm.module.config))
        gen = lambda: _time(lambda: runner.generate(prompt, args.new_tokens))  # noqa: E731
        scorer = RunnerLM(runner)
    res["load_s"] = time.perf_counter() - t0
    gen()  # warm-up
    times = [gen() for _ in range(args.repeats)]
    res["tokens_per_s"] = args.new_tokens / statistics.median(times)
    res["tokens_per_s_best"] = args.new_tokens / min(times)
    res["rss_after_generation_bytes"] = _rss()
    t = time.perf_counter()
    with torch.no_grad():
        res["perplexity"] = perplexity(scorer, ev, args.eval_seq_len).perplexity
    res["ppl_s"] = time.perf_counter() - t
    res["peak_rss_bytes"] = peak_rss_bytes()
    return res


def _time(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _kv_effect(runner: Any, ev: list[int], cfg: Any) -> dict[str, Any]:
    """KL(float cache || quantised cache) over one 2048-token window, and cache bytes at full context."""
    from modelpress.kernels.kvcache import StaticKVCache

    n = min(2048, len(ev))
    ids = torch.tensor([ev[:n]])
    kvq, runner.kv_quant = runner.kv_quant, None
    with torch.no_grad():
        p = runner.forward(ids, runner.new_cache(1, n), 0).float().log_softmax(-1)
        runner.kv_quant = kvq
        q = runner.forward(ids, runner.new_cache(1, n), 0).float().log_softmax(-1)
    kl = float((p.exp() * (p - q)).sum(-1).mean())
    full = cfg.max_position_embeddings
    shape = (runner.n_layers, 1, runner.kv_heads, full, runner.head_dim)
    return {"kv_kl_2048": kl, "kv_context": full,
            "kv_bytes_full_context": StaticKVCache(*shape[:4], shape[4], runner.dtype, kvq).nbytes(),
            "kv_bytes_full_context_float": StaticKVCache(*shape[:4], shape[4], runner.dtype, None).nbytes(),
            "kv_k_scale_range": [float(kvq.k_scale.min()), float(kvq.k_scale.max())]}


def llama_cpp_row(args: argparse.Namespace, gguf: str, tokenizer_src: str) -> dict[str, Any] | None:
    """llama.cpp decode tokens/s and perplexity on the Q4_1 GGUF (greedy, every token generated).

    llama.cpp is reached through ``bench/peers/llamacpp.py`` (llama-cpp-python, or the prebuilt
    library ``bench/setup_llamacpp.sh`` unpacks); the prompt and eval ids come from the same tokenizer.
    """
    sys.path.insert(0, str(HERE))
    from peers.llamacpp import open_llamacpp

    import modelpress as mp
    from modelpress.eval.perplexity import perplexity
    from modelpress.eval.size import peak_rss_bytes

    peer, why = open_llamacpp(gguf, n_threads=args.threads, n_ctx=max(512, args.eval_seq_len))
    if peer is None:
        print(f"llama.cpp row skipped: {why}", file=sys.stderr, flush=True)
        return None
    from modelpress.models.loading import try_tokenizer

    tok = try_tokenizer(str(Path(gguf).parent), gguf_file=Path(gguf).name)  # the GGUF's own: no model load
    prompt, ev = _ids(tok or mp.load(tokenizer_src).tokenizer, args)
    ids = prompt[0].tolist()
    peer.decode_tokens_per_s(ids, args.new_tokens)  # warm-up
    rates = [peer.decode_tokens_per_s(ids, args.new_tokens) for _ in range(args.repeats)]
    res = {"kind": "llama.cpp", "model": gguf, "dtype": "Q4_1", "kv_cache": "f16",
           "tokens_per_s": statistics.median(rates), "tokens_per_s_best": max(rates), "llama_cpp": peer.version,
           "rss_after_generation_bytes": _rss()}
    res["perplexity"] = perplexity(_PeerLM(peer), ev, args.eval_seq_len).perplexity
    res["peak_rss_bytes"] = peak_rss_bytes()
    return res


class _PeerLM(torch.nn.Module):
    """llama.cpp's logits seen as a model, so the same perplexity code scores it."""

    def __init__(self, peer: Any) -> None:
        super().__init__()
        self.peer = peer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (1, seq) -> (1, seq, vocab)
        return torch.from_numpy(self.peer.logits(ids[0].tolist()))[None]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bundled:smollm2-135m-instruct")
    ap.add_argument("--w4", default=str(ROOT / "out/smollm2-gptq-w4-g64"), help="GPTQ W4 folder (modelpress compress output)")
    ap.add_argument("--eval-data", default=str(SHARED / "wikitext2/wiki.test.raw"))
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--eval-seq-len", type=int, default=1024)
    ap.add_argument("--calib", default=str(SHARED / "c4/c4_en_train_first1000.jsonl"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="torch.compile our decode step")
    ap.add_argument("--only", nargs="*", help="row names to run (default: all)")
    ap.add_argument("--out", default="bench/results/e2e_generation")
    args = ap.parse_args()
    from modelpress.eval.perf import run_in_subprocess
    from modelpress.models.loading import resolve_bundled

    paths = prepare(args)
    tok_src = args.model
    configs = [("transformers fp32", "transformers", paths["fp32"], "float32", None),
               ("ours fp32", "ours", paths["fp32"], "float32", None),
               ("ours bf16", "ours", paths["fp32"], "bfloat16", None),
               ("ours W8 (rtn-w8)", "ours", paths["w8"], "bfloat16", None),
               (f"ours W4 ({Path(paths['w4']).name})", "ours", paths["w4"], "bfloat16", None),
               (f"ours W4 ({Path(paths['w4']).name}), torch.compile", "ours", paths["w4"], "bfloat16", None, True),
               (f"ours W4 ({Path(paths['w4']).name}), fused q/k/v + gate/up, torch.compile", "ours", paths["w4"],
                "bfloat16", None, True, True),
               ("ours W4 + int8 LM head, fused, torch.compile", "ours", paths["w4_head8"], "bfloat16", None, True, True),
               ("ours W4 + int8 LM head", "ours", paths["w4_head8"], "bfloat16", None),
               ("ours W4 + int8 LM head, torch.compile", "ours", paths["w4_head8"], "bfloat16", None, True),
               ("ours W4 + int8 KV", "ours", paths["w4"], "bfloat16", "int8"),
               ("ours W4 + fp8 KV", "ours", paths["w4"], "bfloat16", "fp8")]
    rows = []
    for name, kind, path, dtype, kv, *opts in configs:  # opts: (torch.compile, fuse projections)
        if args.only and name not in args.only:
            continue
        try:
            r = run_in_subprocess(row, kind=kind, path=path, dtype=dtype, kv=kv, args=args, tokenizer_src=tok_src,
                                  compile=bool(opts[:1] and opts[0]), fuse=bool(opts[1:] and opts[1]))
        except Exception as e:  # a failed row is reported, the others still run
            print(f"row {name!r} failed: {e}", file=sys.stderr, flush=True)
            continue
        r["row"] = name
        rows.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "kernels"}), flush=True)
        write(args.out, args, paths, rows)
    gguf = str(resolve_bundled(args.model)) if args.model.startswith("bundled:") else None
    lc = run_in_subprocess(llama_cpp_row, args=args, gguf=gguf, tokenizer_src=tok_src) if gguf else None
    if lc:
        lc["row"] = "llama.cpp Q4_1"
        rows.append(lc)
    write(args.out, args, paths, rows, llama_cpp_missing=lc is None)
    return 0


def write(out: str, args: argparse.Namespace, paths: dict[str, str], rows: list[dict], llama_cpp_missing: bool = False) -> None:
    base = next((r for r in rows if r["row"] == "transformers fp32"), None)
    for r in rows:
        if base:
            r["speedup_vs_transformers_fp32"] = r["tokens_per_s"] / base["tokens_per_s"]
            if r.get("perplexity") is not None:
                r["delta_ppl_pct"] = 100 * (r["perplexity"] - base["perplexity"]) / base["perplexity"]
    meta = {k: getattr(args, k) for k in ("model", "eval_data", "eval_tokens", "eval_seq_len", "threads", "new_tokens",
                                           "repeats", "compile")}
    meta.update(paths=paths, torch=torch.__version__, load_avg=os.getloadavg(), llama_cpp_missing=llama_cpp_missing)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    lines = [f"# SmolLM2-135M generation, batch 1, {args.new_tokens} new tokens, {args.threads} threads "
             f"(median of {args.repeats}; torch {torch.__version__})", "",
             f"W4 model: `{paths['w4']}`. ΔPPL: WikiText-2 first {args.eval_tokens} tokens, {args.eval_seq_len}-token "
             f"windows, against transformers fp32. Load average at the end: "
             f"{', '.join(f'{x:.1f}' for x in meta['load_avg'])} (shared 2-core machine).", "",
             "RSS after generation: the process after loading and generating (what serving holds); peak RSS also "
             "covers the perplexity pass (1024-token windows of 49k-vocab logits).", "",
             "| row | tokens/s | x transformers fp32 | RSS after generation MiB | peak RSS MiB | PPL | ΔPPL |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ppl = f"{r['perplexity']:.3f}" if r.get("perplexity") is not None else "-"
        d = f"{r['delta_ppl_pct']:+.2f}%" if r.get("delta_ppl_pct") is not None else "-"
        gen_rss = f"{r['rss_after_generation_bytes'] / 2**20:.0f}" if r.get("rss_after_generation_bytes") else "-"
        lines.append(f"| {r['row']} | {r['tokens_per_s']:.1f} | {r.get('speedup_vs_transformers_fp32', float('nan')):.2f} | "
                     f"{gen_rss} | {r['peak_rss_bytes'] / 2**20:.0f} | {ppl} | {d} |")
    kv = [r for r in rows if "kv_kl_2048" in r]
    if kv:
        lines += ["", "| KV cache | bytes at full context | float cache bytes | saved | KL vs float cache (2048 tokens) |",
                  "|---|---|---|---|---|"]
        for r in kv:
            lines.append(f"| {r['kv_cache']} ({r['kv_context']} positions) | {r['kv_bytes_full_context'] / 2**20:.1f} MiB | "
                         f"{r['kv_bytes_full_context_float'] / 2**20:.1f} MiB | "
                         f"{1 - r['kv_bytes_full_context'] / r['kv_bytes_full_context_float']:.0%} | {r['kv_kl_2048']:.2e} |")
    if llama_cpp_missing:
        lines += ["", "llama.cpp: not available here (run `bash bench/setup_llamacpp.sh`); row not measured."]
    Path(out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
