"""``modelpress search``: NSGA-II over a recipe space, each trial a real compression and evaluation.

Glue only: parses options into a :class:`~modelpress.search.optuna_search.SearchConfig` and calls
:func:`~modelpress.search.optuna_search.run_search`. Start the same command in several processes
(or on several machines with a database URL) to run trials in parallel; rerun it to continue.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from . import args as A

EXAMPLES = """examples:
  modelpress search --model bundled:smollm2-135m-instruct --space space.yaml --trials 24 \\
      --storage sqlite:///smol.db --study smol --out smol-search
  # a second worker on the same study (same command, another terminal or machine):
  modelpress search ... --storage postgresql://user@host/db --study smol --out smol-search
space.yaml:
  params: {method: {choices: [rtn, gptq]}, bits: {choices: [2, 3, 4, 8]}, group: {choices: [32, 64, 128]},
           sparsity: {low: 0.0, high: 0.7, step: 0.1}}
  stages:
    - {method: magnitude, when: sparsity, ignore: [lm_head], pattern: unstructured, sparsity: $sparsity}
    - {method: $method, ignore: [lm_head], format: {type: int, bits: $bits, granularity: $group}}"""


def add_parser(sub: Any) -> None:
    """Register the ``search`` subcommand."""
    s = sub.add_parser("search", help="multi-objective search (perplexity, size, latency) over recipe parameters",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--model", required=True, help="hub id, folder, .gguf, llama2.c .bin or bundled:NAME")
    s.add_argument("--space", required=True, help="search space YAML: params and a recipe template (see below)")
    s.add_argument("--trials", type=A.positive_int, required=True,
                   help="complete trials the study should hold (those already in it count)")
    s.add_argument("--storage", required=True, help="Optuna storage URL: sqlite:///study.db, or a database URL "
                                                    "(postgresql://..., mysql://...) shared by workers on many machines")
    s.add_argument("--study", required=True, help="study name; rerunning with the same name continues it")
    s.add_argument("--out", required=True, help="folder for search.json / search.md and each trial's reports")
    s.add_argument("--calib", help="calibration text for calibrated methods (default bundled:c4)")
    s.add_argument("--calib-samples", type=A.positive_int, default=32, help="calibration windows (default 32)")
    s.add_argument("--calib-seq-len", type=A.window_len, default=512, help="tokens per calibration window (default 512)")
    s.add_argument("--eval-data", default="bundled:wikitext2", help="perplexity text (default bundled:wikitext2)")
    s.add_argument("--eval-max-tokens", type=A.positive_int, default=4096, help="tokens scored per trial (default 4096)")
    s.add_argument("--eval-seq-len", type=A.window_len, default=None, help="perplexity window (default min(2048, model max))")
    s.add_argument("--join-lines", action="store_true", help="join the text's non-empty lines with blank lines")
    s.add_argument("--latency-prompt", type=A.positive_int, default=32, help="prompt tokens for the latency (default 32)")
    s.add_argument("--latency-tokens", type=A.window_len, default=16, help="decode steps timed (default 16)")
    s.add_argument("--threads", type=A.thread_count, default=1, help="torch threads per worker (default 1)")
    s.add_argument("--seed", type=A.nonneg_int, default=None, help="sampler seed (default: a fresh one per worker)")
    s.add_argument("--population", type=A.positive_int, default=None,
                   help="NSGA-II population (default trials/3, between 4 and 50)")
    s.add_argument("--heartbeat", type=A.positive_int, default=30,
                   help="seconds between a running trial's heartbeats; a trial silent for twice that is retried")
    s.add_argument("--keep-models", action="store_true", help="keep each trial's compressed model folder")


def cmd_search(args: argparse.Namespace) -> int:
    import torch

    from ..data.sources import check_source
    from ..search.objectives import EvalSettings
    from ..search.optuna_search import SearchConfig, open_storage, run_search
    from ..search.space import read_space

    space = read_space(args.space)  # what the user can get wrong fails before the slow model load
    open_storage(args.storage, args.heartbeat)
    for spec, what in ((args.eval_data, "--eval-data"), (args.calib, "--calib")):
        if spec:
            check_source(spec, what)
    torch.set_num_threads(args.threads)
    ev = EvalSettings(model=args.model, eval_data=args.eval_data, eval_max_tokens=args.eval_max_tokens,
                      eval_seq_len=args.eval_seq_len, join_lines=True if args.join_lines else None, calib=args.calib,
                      calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len,
                      latency_prompt=args.latency_prompt, latency_tokens=args.latency_tokens,
                      keep_models=args.keep_models)
    cfg = SearchConfig(space=space, evaluation=ev, trials=args.trials, storage=args.storage, study=args.study,
                       out=Path(args.out), seed=args.seed, population=args.population, heartbeat_s=args.heartbeat)
    res = run_search(cfg, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"study {res['study']}: {res['counts']} trials; Pareto front {res['pareto']}; wrote "
          f"{cfg.out / 'search.json'} and {cfg.out / 'search.md'}", file=sys.stderr)
    return 0
