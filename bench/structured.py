"""Structured pruning on one model: dense vs structured-25 (calibrated score) vs structured-25 (random score).

For each variant: parameters, ΔPPL (same eval tokens), size of the saved ``model.safetensors``,
and CPU speed of the saved folder reloaded with plain ``transformers.AutoModelForCausalLM
.from_pretrained`` (so the speed is what a user of the smaller model gets): decode tokens/s
(batch 1, greedy, HF ``generate``; the time of 1 new token is subtracted from the time of N so the
prompt's prefill does not count) and prefill tokens/s (one forward over a long prompt).

On a shared, loaded machine each variant is timed *interleaved with the dense model* right after it
is built (``repeats`` rounds, medians), and its speed is reported as a ratio to that dense timing;
results are written after every row so a stopped run keeps what it measured.

structured-25 refits the kept columns of o_proj / down_proj by least squares; rows without the refit
show what the score alone does.

    python bench/structured.py --threads 1 --out bench/results/smollm2_structured
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("MODELPRESS_SHARED", HERE.parents[1] / "shared")) / "data"

def _stage(**kw) -> dict:
    return {"name": "structured-25-variant", "stages": [{"method": "structured", "heads_fraction": 0.25,
                                                         "mlp_fraction": 0.25, **kw}]}


VARIANTS = {  # in order of importance: a run stopped early keeps the first rows
    "dense": None,
    "structured-25 (activation score + refit)": "structured-25",
    "activation score, no refit": _stage(score="activation", reconstruct=False),
    "random score, no refit": _stage(score="random", reconstruct=False),
    "structured-25 (random score + refit)": _stage(score="random", reconstruct=True),
}
KV_VARIANT = {"structured-25, whole K/V groups": _stage(score="activation", reconstruct=True, gqa="kv")}

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bundled:smollm2-135m-instruct")
    ap.add_argument("--eval-data", default=str(SHARED / "wikitext2/wiki.test.raw"))
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--eval-seq-len", type=int, default=1024)
    ap.add_argument("--calib", default=str(SHARED / "c4/c4_en_train_first1000.jsonl"))
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32, help="prompt length for decode timing")
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kv-groups", action="store_true", help="add a row pruning whole K/V groups (gqa: kv)")
    ap.add_argument("--out", required=True, help="output path without extension (.json and .md are written)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MODELPRESS_PROGRESS", "0")
    import modelpress as mp
    from modelpress.eval.perplexity import perplexity, read_text
    from modelpress.eval.size import count_params, disk_bytes

    base = mp.load(args.model)
    ids = base.tokenizer.encode(read_text(args.eval_data, True))[: args.eval_tokens]
    bos = base.tokenizer.bos_token_id if base.add_bos else None
    calib = mp.calibration_for(base, args.calib, args.calib_samples, args.calib_seq_len)
    variants = {**VARIANTS, **(KV_VARIANT if args.kv_groups else {})}
    meta = {k: getattr(args, k) for k in ("model", "eval_data", "eval_tokens", "eval_seq_len", "calib", "calib_samples",
                                           "calib_seq_len", "threads", "new_tokens", "prompt_tokens", "prefill_tokens",
                                           "repeats")}
    meta.update(torch=torch.__version__, machine=os.uname().nodename, cpus=os.cpu_count())
    rows = []
    with tempfile.TemporaryDirectory(prefix="structured-bench-") as tmp:
        dense = None
        for name, recipe in variants.items():
            row, model = build(mp, base, name, recipe, calib, ids, bos, args, Path(tmp), perplexity, count_params,
                               disk_bytes)
            dense = dense or (row, model)
            speed(dense[1], model, ids, args, row)
            rows.append(row)
            finish(rows)
            print(json.dumps({k: v for k, v in row.items() if k != "timings_s"}), flush=True)
            write(args.out, meta, rows)
            del model


def finish(rows: list[dict]) -> None:
    """Ratios to the dense row (speed: to the dense timing taken beside each row)."""
    d = rows[0]
    for r in rows:
        r["delta_ppl_pct"] = 100 * (r["perplexity"] - d["perplexity"]) / d["perplexity"]
        r["params_vs_dense"], r["file_bytes_vs_dense"] = r["params"] / d["params"], r["file_bytes"] / d["file_bytes"]


def build(mp, base, name, recipe, calib, ids, bos, args, tmp: Path, perplexity, count_params, disk_bytes):
    """Prune a copy of the base model, evaluate it, save it, reload the folder with plain transformers."""
    import transformers

    lm = mp.load(copy.deepcopy(base.module))
    lm.tokenizer, lm.add_bos, lm.source = base.tokenizer, base.add_bos, base.source
    t = time.perf_counter()
    rep = mp.compress(lm, recipe, calib=calib, progress=False) if recipe is not None else {"warnings": [], "layers": []}
    compress_s = time.perf_counter() - t
    with torch.no_grad():
        ppl = perplexity(lm.module, ids, args.eval_seq_len, bos_token_id=bos).perplexity
    folder = tmp / f"variant{len(list(tmp.iterdir()))}"
    mp.save(lm, folder, recipe=recipe)
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    probe = torch.tensor([ids[:64]])
    with torch.no_grad():
        diff = float((plain(probe).logits - lm.module(probe).logits).abs().max())
    cfg = plain.config
    row = {"variant": name, "perplexity": ppl, "params": count_params(plain), "file_bytes": disk_bytes(folder),
           "compress_s": compress_s, "reload_max_abs_logit_diff": diff,
           "config": {k: getattr(cfg, k) for k in ("num_attention_heads", "num_key_value_heads", "head_dim",
                                                    "intermediate_size", "num_hidden_layers")},
           "warnings": rep["warnings"][:3]}
    return row, plain


def speed(dense, model, ids: list[int], args, row: dict) -> None:
    """Decode and prefill tokens/s of ``model`` and of ``dense``, interleaved, ``repeats`` rounds, medians."""
    prompt = torch.tensor([ids[: args.prompt_tokens]])
    long = torch.tensor([ids[: args.prefill_tokens]])

    def gen(m, n: int) -> float:
        t = time.perf_counter()
        out = m.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        assert out.shape[1] == prompt.shape[1] + n
        return time.perf_counter() - t

    def prefill(m) -> float:
        t = time.perf_counter()
        m(long, use_cache=False)
        return time.perf_counter() - t

    models = {"variant": model} if model is dense else {"dense": dense, "variant": model}
    times: dict = {k: {"gen_n": [], "gen_1": [], "prefill": []} for k in models}
    with torch.no_grad():
        for m in models.values():  # warm-up
            gen(m, 2)
        for _ in range(args.repeats):
            for k, m in models.items():
                times[k]["gen_n"].append(gen(m, args.new_tokens))
                times[k]["gen_1"].append(gen(m, 1))
                times[k]["prefill"].append(prefill(m))
    for k in ("dense", "variant"):
        t = {q: statistics.median(v) for q, v in times[k if k in models else "variant"].items()}
        pre = "" if k == "variant" else "dense_"
        row[f"{pre}decode_tokens_per_s"] = (args.new_tokens - 1) / (t["gen_n"] - t["gen_1"])
        row[f"{pre}prefill_tokens_per_s"] = args.prefill_tokens / t["prefill"]
    row["decode_vs_dense"] = row["decode_tokens_per_s"] / row["dense_decode_tokens_per_s"]
    row["prefill_vs_dense"] = row["prefill_tokens_per_s"] / row["dense_prefill_tokens_per_s"]
    row["timings_s"] = times


def write(out: str, meta: dict, rows: list[dict]) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# {meta['model']}: structured pruning",
             "", f"WikiText-2 test, first {meta['eval_tokens']} tokens, {meta['eval_seq_len']}-token windows; calibration "
             f"{meta['calib_samples']} x {meta['calib_seq_len']} tokens from {Path(meta['calib']).name}. Speed of the "
             f"saved folder reloaded with plain `transformers` (fp32, {meta['threads']} thread(s), torch {meta['torch']}): "
             f"decode = batch 1, greedy, {meta['new_tokens']} new tokens after a {meta['prompt_tokens']}-token prompt; "
             f"prefill = one {meta['prefill_tokens']}-token forward; each row timed interleaved with the dense model "
             f"right after it was built, medians of {meta['repeats']} rounds, ratio to that dense timing. "
             "No recovery fine-tuning.", "",
             "| variant | heads (q/kv) | MLP width | params | file MB | decode tok/s | prefill tok/s | PPL | ΔPPL |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["config"]
        lines.append(f"| {r['variant']} | {c['num_attention_heads']}/{c['num_key_value_heads']} | {c['intermediate_size']} | "
                     f"{r['params'] / 1e6:.1f}M ({r['params_vs_dense']:.2f}x) | {r['file_bytes'] / 1e6:.0f} "
                     f"({r['file_bytes_vs_dense']:.2f}x) | {r['decode_tokens_per_s']:.1f} "
                     f"({r['decode_vs_dense']:.2f}x) | {r['prefill_tokens_per_s']:.0f} "
                     f"({r['prefill_vs_dense']:.2f}x) | {r['perplexity']:.3f} | {r['delta_ppl_pct']:+.1f}% |")
    Path(out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
