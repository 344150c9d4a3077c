"""``modelpress adapt``: train a PEFT adapter (LoRA, DoRA, VeRA, AdaLoRA, IA3) on a model, a
quantised one included (QLoRA), and write it in PEFT's own format.

Glue only: options become an :class:`~modelpress.lowrank.adapters.AdapterConfig` and a
:class:`~modelpress.distill.trainer.TrainConfig` for :func:`~modelpress.lowrank.adapters.run.adapt`.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from . import args as A

EXAMPLES = """examples:
  modelpress compress --model bundled:smollm2-135m-instruct --recipe qlora-nf4 --output out/smol-nf4
  modelpress adapt --model out/smol-nf4 --method lora --data input.txt --steps 80 --output out/smol-lora
  modelpress adapt --model out/smol-nf4 --method dora --targets q_proj,v_proj --data input.txt --steps 80 \\
      --output out/smol-dora --merge
the adapter loads with peft.PeftModel.from_pretrained(mp.load("out/smol-nf4").module, "out/smol-lora")"""

METHODS = ("lora", "dora", "vera", "adalora", "ia3")


def add_parser(sub: Any) -> None:
    """Register the ``adapt`` subcommand."""
    p = sub.add_parser("adapt", help="train a PEFT adapter (QLoRA on a quantised model) and save it in PEFT's format",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="hub id, folder, modelpress output (e.g. qlora-nf4) or bundled:NAME")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a hub model's own Python code")
    p.add_argument("--method", choices=METHODS, default="lora", help="adapter (lora and dora also on quantised layers)")
    p.add_argument("--r", type=A.positive_int, default=8, help="rank (AdaLoRA: initial rank; VeRA: shared rank)")
    p.add_argument("--alpha", type=A.positive_float, default=16.0, help="LoRA scaling numerator (alpha / r)")
    p.add_argument("--dropout", type=A.share, default=0.0)
    p.add_argument("--targets", help="comma-separated module names or suffixes (default: every linear but the head)")
    p.add_argument("--data", required=True, help="training text: a file, JSONL with 'text', hf:DATASET or bundled:NAME")
    p.add_argument("--steps", type=A.positive_int, required=True, help="optimizer steps")
    p.add_argument("--batch-size", type=A.positive_int, default=4, help="sequences per step (default 4)")
    p.add_argument("--seq-len", type=A.window_len, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--lr", type=A.positive_float, default=2e-4, help="AdamW learning rate (default 2e-4)")
    p.add_argument("--seed", type=A.nonneg_int, default=0)
    p.add_argument("--output", required=True, help="new folder for adapter_config.json + adapter_model.safetensors")
    m = p.add_mutually_exclusive_group()
    m.add_argument("--merge", action="store_true",
                   help="also merge into the base (a quantised base is re-quantised; the error is reported) "
                        "and save the merged model in OUTPUT/merged")
    m.add_argument("--merge-dense", action="store_true",
                   help="also merge, turning each adapted quantised layer into a dense W + dW (exact, fp32 size); "
                        "saved in OUTPUT/merged")


def cmd_adapt(args: argparse.Namespace) -> int:
    from .. import api
    from ..data.sources import check_source
    from ..distill.trainer import TrainConfig
    from ..lowrank.adapters import AdapterConfig
    from ..lowrank.adapters.run import adapt, check_output

    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip()) if args.targets else None
    cfg = AdapterConfig(method=args.method, r=args.r, alpha=args.alpha, dropout=args.dropout, targets=targets,
                        seed=args.seed)
    train = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                        log_every=max(1, args.steps // 10))
    check_output(args.output)  # what the user can get wrong fails before the slow load
    check_source(args.data, "--data file")
    lm = api.load(args.model, trust_remote_code=args.trust_remote_code)
    rep = adapt(lm, cfg, train, args.data, args.output, seq_len=args.seq_len, merge=args.merge,
                merge_dense=args.merge_dense, progress=not args.quiet)
    res, losses = rep["result"], rep["result"]["losses"]
    loss = f", loss {losses[0][1]:.3f} (step {losses[0][0]}) -> {losses[-1][1]:.3f}" if len(losses) > 1 else ""
    print(f"wrote {args.output}: {args.method} adapter, {rep['trainable_params']:,} trainable parameters; "
          f"{res['steps']} steps, {res['tokens']:,} tokens, {res['cpu_s']:.1f} CPU s, {res['wall_s']:.1f} s{loss}",
          file=sys.stderr)
    if "merge" in rep:
        m = rep["merge"]
        lost = f"; share of the update lost by rounding mean {m['delta_lost_mean']:.3g}" if m["requantised_layers"] else ""
        print(f"merged into {args.output}/merged: {m['requantised_layers']} layers re-quantised, logits relative "
              f"error {m['output_rel_error']:.4g} vs the unmerged adapter{lost}", file=sys.stderr)
    return 0
