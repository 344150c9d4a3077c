"""``modelpress generate``: training text sampled from a teacher, deduplicated and filtered by the
teacher's own score, written as JSONL that ``compress --train`` reads.

Glue only: parses options into a :class:`~modelpress.distill.generate.GenerateConfig` and calls
:func:`~modelpress.distill.generate.generate_dataset`.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from . import args as A

EXAMPLES = """examples:
  modelpress generate --model bundled:smollm2-135m-instruct --from-docs bundled:c4 --samples 512 --output gen.jsonl
  modelpress generate --model TEACHER --prompts prompts.txt --samples 256 --temperature 0.8 --top-p 0.95 \
      --output gen.jsonl
  modelpress compress --model TEACHER --recipe distill-half-depth --train gen.jsonl --output student"""


def add_parser(sub: Any) -> None:
    """Register the ``generate`` subcommand."""
    g = sub.add_parser("generate", help="sample training text from a teacher (deduplicated, filtered) as JSONL",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("--model", required=True, help="the teacher: hub id, folder, .gguf, llama2.c .bin or bundled:NAME")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow a hub model's own Python code (off by default)")
    g.add_argument("--output", required=True,
                   help="JSONL file to write (with FILE.export.json, its provenance, beside it)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output (only one modelpress wrote)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", help="prompts file: one per line, or JSONL with a 'prompt' (or 'text') field")
    src.add_argument("--from-docs", help="text source (file, JSONL, hf:DATASET, bundled:NAME) whose documents' first "
                                         "--prompt-tokens tokens are the prompts")
    g.add_argument("--prompt-tokens", type=A.positive_int_up_to(65536), default=16,
                   help="tokens of each document used as its prompt (default 16)")
    g.add_argument("--samples", type=A.positive_int_up_to(10_000_000), default=64,
                   help="sequences to generate, prompts taken in turn (default 64)")
    g.add_argument("--max-new-tokens", type=A.positive_int_up_to(65536), default=128,
                   help="tokens generated per prompt at most (default 128)")
    g.add_argument("--temperature", type=A.positive_float, default=1.0, help="sampling temperature (default 1.0)")
    g.add_argument("--top-p", type=A.probability, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    g.add_argument("--top-k", type=A.nonneg_int, default=0, help="sample among the k likeliest tokens (default 0: off)")
    g.add_argument("--seed", type=A.nonneg_int, default=0)
    g.add_argument("--batch-size", type=A.positive_int_up_to(4096), default=8, help="prompts generated together (default 8)")
    g.add_argument("--near-duplicate", type=A.probability, default=0.8,
                   help="word-shingle Jaccard from which a sample is a near duplicate (default 0.8)")
    g.add_argument("--min-logprob", type=A.log_probability, default=None,
                   help="drop samples whose mean log-probability per generated token under the teacher is lower")
    g.add_argument("--drop-fraction", type=A.share, default=0.0, help="drop this fraction of the least likely samples")


def cmd_generate(args: argparse.Namespace) -> int:
    from .. import api
    from ..core.outputs import check_replaceable
    from ..data.sources import check_source
    from ..distill.generate import GenerateConfig, check_output, generate_dataset

    cfg = GenerateConfig(prompts=args.prompts, from_docs=args.from_docs, prompt_tokens=args.prompt_tokens,
                         samples=args.samples, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_p=args.top_p, top_k=args.top_k, seed=args.seed, batch_size=args.batch_size,
                         near_duplicate=args.near_duplicate, min_logprob=args.min_logprob,
                         drop_fraction=args.drop_fraction)
    check_output(args.output)
    check_replaceable(args.output, args.overwrite)  # what the user can get wrong fails before the slow load
    check_source(args.prompts or args.from_docs, "--prompts file" if args.prompts else "--from-docs source")
    lm = api.load(args.model, trust_remote_code=args.trust_remote_code)
    report = generate_dataset(lm, cfg, args.output, overwrite=args.overwrite)
    c = report.counts
    print(f"wrote {report.path}: {c['kept']} of {c['generated']} samples kept ({c['empty']} empty, "
          f"{c['exact_duplicate']} exact and {c['near_duplicate']} near duplicates, {c['unlikely']} unlikely) "
          f"in {report.seconds:.1f}s", file=sys.stderr)
    return 0
