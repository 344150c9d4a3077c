"""Peer job run inside llm-compressor's own venv: GPTQ on the same model, tokens and eval as ours.

Reads calibration and evaluation token ids written by bench/gptq_vs_peers.py, so both tools see
identical inputs; evaluates with modelpress's perplexity function (pure torch) on llm-compressor's
own in-memory quantised model.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--tokens", required=True, help="safetensors with 'calib' (N, L) and 'eval' (T,) ids")
    ap.add_argument("--bits", type=int, required=True)
    ap.add_argument("--group", type=int, default=0, help="0 = per channel")
    ap.add_argument("--eval-seq-len", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", required=True)
    ap.add_argument("--matmul-precision", choices=["fp32", "bf16"], default="fp32",
                    help="bf16: torch.set_float32_matmul_precision('medium') for the whole oneshot run (the peer has no "
                         "scoped setting; this is what its user can do)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # modelpress from this checkout (not in the peer's venv)
    from modelpress.eval.perplexity import perplexity

    toks = load_file(args.tokens)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, gguf_file=args.gguf, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir, gguf_file=args.gguf)
    # llm-compressor re-reads the config from model.name_or_path; a GGUF folder has none, so give it one
    cfg_dir = tempfile.mkdtemp(prefix="llmc-cfg-")
    if hasattr(model.config, "quantization_config"):  # the GGUF marker: the weights are fp32 now
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.save_pretrained(cfg_dir)
    tokenizer.save_pretrained(cfg_dir)
    model.name_or_path = model.config._name_or_path = cfg_dir
    load_s = time.perf_counter() - t0
    strategy = {"strategy": "group", "group_size": args.group} if args.group else {"strategy": "channel"}
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(num_bits=args.bits, type="int", symmetric=True, **strategy))
    recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"], block_size=128, dampening_frac=0.01)
    calib = toks["calib"]
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    torch.set_float32_matmul_precision("medium" if args.matmul_precision == "bf16" else "highest")
    t1, c1 = time.perf_counter(), time.process_time()
    oneshot(model=model, processor=tokenizer, dataset=ds, recipe=recipe, num_calibration_samples=calib.shape[0],
            max_seq_length=calib.shape[1], pipeline="sequential")
    compress_s, compress_cpu_s = time.perf_counter() - t1, time.process_time() - c1
    torch.set_float32_matmul_precision("highest")  # the eval is the same exact code for every row
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model.eval()
    with torch.no_grad():
        ppl = perplexity(model, toks["eval"], args.eval_seq_len).perplexity
    json.dump({"tool": "llm-compressor", "perplexity": ppl, "compress_s": compress_s, "compress_cpu_s": compress_cpu_s, "load_s": load_s,
               "peak_rss_bytes_before_eval": rss}, open(args.json, "w"))


if __name__ == "__main__":
    main()
