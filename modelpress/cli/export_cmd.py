"""``modelpress export``: write a model as Hugging Face, compressed-tensors (vLLM) or GGUF (llama.cpp).

Glue only: parses options and calls :func:`modelpress.export.export.export`.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from ..core.errors import ModelpressError

EXAMPLES = """examples:
  modelpress export --model out/smol-gptq-w4-g64 --format compressed-tensors --output out/smol-ct
  modelpress export --model out/smol-gptq-w4-g64 --format gguf --gguf-type Q4_0 --output out/smol-q4_0.gguf
  modelpress export --model out/smol-rtn-w8 --format hf --dtype bfloat16 --output out/smol-dense"""


def add_parser(sub: Any) -> None:
    """Register the ``export`` subcommand; formats and their option flags come from the writer registry."""
    from ..export.writers import WRITERS

    p = sub.add_parser("export", help="write " + " / ".join(WRITERS.names()) + " files that other runtimes load",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="modelpress output folder, HF folder, .gguf, bundled:NAME ...")
    p.add_argument("--format", required=True, choices=WRITERS.names(), dest="export_format",
                   help="; ".join(f"{n}: {w.summary}" for n, w in WRITERS.items()))
    p.add_argument("--output", required=True, help="output folder, or file for single-file formats (.gguf)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (only one modelpress wrote)")
    p.add_argument("--on-unsupported", choices=["refuse", "dequantize", "requantize"], default="refuse",
                   help="a layer the target cannot represent: stop and list them (default), write it as "
                        "float, or re-quantise it to the nearest format the target has")
    for opt, fmts in _options().items():
        p.add_argument(f"--{opt.flag}", dest=opt.dest, default=None, choices=opt.choices,
                       help=f"{'/'.join(fmts)}: {opt.help} (default {opt.default})")
    p.add_argument("--trust-remote-code", action="store_true")


def _options() -> dict[Any, list[str]]:
    """Every writer option once, with the formats that take it."""
    from ..export.writers import WRITERS

    out: dict[Any, list[str]] = {}
    for name, w in WRITERS.items():
        for opt in w.options:
            out.setdefault(opt, []).append(name)
    return out


def cmd_export(args: argparse.Namespace) -> int:
    from .. import api
    from ..export.export import export
    from ..export.writers import WRITERS

    writer = WRITERS.get(args.export_format)
    mine = {o.dest for o in writer.options}
    for opt in _options():
        if getattr(args, opt.dest) is not None and opt.dest not in mine:
            raise ModelpressError(f"--{opt.flag} does not apply to --format {writer.name}")
    opts = {o.dest: getattr(args, o.dest) if getattr(args, o.dest) is not None else o.default for o in writer.options}
    lm = api.load(args.model, trust_remote_code=args.trust_remote_code)
    report = export(lm, writer.name, args.output, on_unsupported=args.on_unsupported, overwrite=args.overwrite, **opts)
    print(report.summary(), file=sys.stderr)
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0
