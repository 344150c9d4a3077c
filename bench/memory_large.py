"""Peak memory of low-memory compression on a synthetic Llama-shaped model larger than the memory
it may use, with and without the float reference.

Writes a random-weight Llama (fp32, sharded safetensors, >= --target-gb), then runs
``modelpress compress --low-memory`` on it once per variant, each in its own process under
/usr/bin/time, and reports peak RSS as a fraction of the fp32 weight bytes. The point is memory,
not quality: a few random calibration windows. A ``+block-error`` variant appends the
``block-error`` stage, which reads the float reference block by block (from the source files in
low-memory mode): its row against the plain one is what the reference costs in memory.

    python bench/memory_large.py --target-gb 6 --out bench/results/memory_large
    python bench/memory_large.py --target-gb 6 --variants wanda wanda+block-error --out bench/results/memory_reference
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

STAGES = {
    "gptq": "  - method: gptq\n    ignore: [lm_head]\n    act_order: false\n    true_sequential: true\n"
            "    format: {type: int, bits: 4, symmetric: true, granularity: 128}\n",
    "wanda": "  - method: wanda\n    sparsity: 0.5\n",
    "block-error": "  - method: block-error\n",
}


def recipe(variant: str) -> str:
    """YAML for ``a+b`` (stages in order), e.g. ``gptq`` or ``wanda+block-error``."""
    return f"name: {variant}\nstages:\n" + "".join(STAGES[p] for p in variant.split("+"))


def write_model(folder: Path, target_gb: float, hidden: int, inter: int, vocab: int) -> int:
    """Random fp32 Llama with enough layers for ``target_gb``; one shard per block. Returns bytes."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    kv = hidden // 4
    per_block = 4 * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter + 2 * hidden)
    rest = 4 * (2 * vocab * hidden + hidden)
    layers = max(1, int(-(-(target_gb * 1e9 - rest) // per_block)))
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=hidden // 128, num_key_value_heads=hidden // 512, max_position_embeddings=2048,
                      tie_word_embeddings=False)
    folder.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(folder))
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g) * 0.02  # noqa: E731
    wm = {}
    shapes = {"self_attn.q_proj.weight": (hidden, hidden), "self_attn.k_proj.weight": (kv, hidden),
              "self_attn.v_proj.weight": (kv, hidden), "self_attn.o_proj.weight": (hidden, hidden),
              "mlp.gate_proj.weight": (inter, hidden), "mlp.up_proj.weight": (inter, hidden),
              "mlp.down_proj.weight": (hidden, inter)}
    for i in range(layers):
        sd = {f"model.layers.{i}.{k}": rnd(*s) for k, s in shapes.items()}
        sd[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(hidden)
        sd[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(hidden)
        name = f"model-{i:05d}.safetensors"
        save_file(sd, str(folder / name), metadata={"format": "pt"})
        wm.update({k: name for k in sd})
    sd = {"model.embed_tokens.weight": rnd(vocab, hidden), "lm_head.weight": rnd(vocab, hidden),
          "model.norm.weight": torch.ones(hidden)}
    save_file(sd, str(folder / "model-rest.safetensors"), metadata={"format": "pt"})
    wm.update({k: "model-rest.safetensors" for k in sd})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target-gb", type=float, default=6.0)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--workdir", default="/tmp/mp-memory-large")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--variants", nargs="+", default=["gptq"],
                    help=f"recipes to run, stages joined by '+': {', '.join(STAGES)} (default: gptq)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from safetensors.torch import save_file

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    t = time.perf_counter()
    fp32 = write_model(work / "model", args.target_gb, args.hidden, args.inter, args.vocab)
    gen_s = time.perf_counter() - t
    calib = torch.randint(0, args.vocab, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(1))
    save_file({"calib": calib}, str(work / "calib.safetensors"))
    rows = [run_variant(v, work, args) | {"fp32_bytes": fp32} for v in args.variants]
    cfg = json.loads((work / "model/config.json").read_text())
    res = {"rows": rows, "generate_s": gen_s, "config": cfg, "calib": [args.samples, args.seq_len],
           "cpus": os.cpu_count(), "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "2")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(res, indent=2))
    md = ["# Low-memory compression of a synthetic Llama", "",
          f"{cfg['num_hidden_layers']} layers, hidden {args.hidden}, MLP {args.inter}, vocab {args.vocab}; "
          f"calibration {args.samples} x {args.seq_len} random tokens; each variant in its own process", "",
          "| variant | fp32 weights GB | peak RSS GB | RSS / fp32 | output GB | compress wall s |", "|---|---|---|---|---|---|"]
    md += [f"| {r['variant']} | {fp32 / 1e9:.2f} | {r['peak_rss_bytes'] / 1e9:.2f} | {r['peak_rss_bytes'] / fp32:.3f} | "
           f"{r['output_bytes'] / 1e9:.2f} | {r['compress_wall_s']:.0f} |" for r in rows]
    Path(args.out + ".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def run_variant(variant: str, work: Path, args: argparse.Namespace) -> dict:
    """One ``compress --low-memory`` process under /usr/bin/time: peak RSS, wall time, output size."""
    (work / "recipe.yaml").write_text(recipe(variant))
    out = work / f"out-{variant}"
    cmd = [sys.executable, "-m", "modelpress.cli.main", "--quiet", "compress", "--model", str(work / "model"),
           "--recipe", str(work / "recipe.yaml"), "--calib", str(work / "calib.safetensors"),
           "--calib-samples", str(args.samples), "--calib-seq-len", str(args.seq_len), "--low-memory",
           "--output", str(out)]
    t = time.perf_counter()
    # two malloc arenas: glibc otherwise keeps a per-thread arena of freed float blocks resident
    env = {**os.environ, "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "2")}
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(p.stderr[-3000:])
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) * 1024
    out_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    shutil.rmtree(out, ignore_errors=True)
    return {"variant": variant, "peak_rss_bytes": rss, "compress_wall_s": wall, "output_bytes": out_bytes}


if __name__ == "__main__":
    main()
