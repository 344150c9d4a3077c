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
    """Register the ``export`` subcommand on the main parser's subparsers."""
    p = sub.add_parser("export", help="write hf / compressed-tensors / gguf files that other runtimes load",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="modelpress output folder, HF folder, .gguf, bundled:NAME ...")
    p.add_argument("--format", required=True, choices=["hf", "compressed-tensors", "gguf"], dest="export_format")
    p.add_argument("--output", required=True, help="output folder (hf, compressed-tensors) or .gguf file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--on-unsupported", choices=["refuse", "dequantize", "requantize"], default="refuse",
                   help="a layer the target cannot represent: stop and list them (default), write it as "
                        "float, or re-quantise it to the nearest format the target has")
    p.add_argument("--gguf-type", default=None, help="GGUF tensor type: F32 F16 Q8_0 Q4_0 Q4_1 Q4_K Q5_K Q6_K (default Q4_0)")
    p.add_argument("--gguf-float-type", default=None,
                   help="GGUF type for tensors modelpress left in float (embeddings): F16 (default), F32, Q8_0 ... or 'same'")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="hf: weight dtype (default float32)")
    p.add_argument("--trust-remote-code", action="store_true")


def cmd_export(args: argparse.Namespace) -> int:
    from .. import api
    from ..export.export import export

    fmt = args.export_format
    opts: dict[str, Any] = {}
    if fmt == "gguf":
        opts = {"gguf_type": args.gguf_type or "Q4_0", "float_type": args.gguf_float_type or "F16"}
    elif args.gguf_type or args.gguf_float_type:
        raise ModelpressError("--gguf-type / --gguf-float-type apply to --format gguf only")
    if fmt == "hf":
        opts["dtype"] = args.dtype or "float32"
    elif args.dtype:
        raise ModelpressError("--dtype applies to --format hf only")
    lm = api.load(args.model, trust_remote_code=args.trust_remote_code)
    report = export(lm, fmt, args.output, on_unsupported=args.on_unsupported, overwrite=args.overwrite, **opts)
    print(report.summary(), file=sys.stderr)
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0
