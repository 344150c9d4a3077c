"""``modelpress report``: one self-contained HTML file and a Markdown summary of eval JSONs, compress
reports, bench JSONs and searches.

Glue only: reads the inputs (:func:`modelpress.report.inputs.read_inputs`) and writes the report
(:func:`modelpress.report.render.write_report`).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from ..core.errors import ModelpressError
from . import args as A

EXAMPLES = """examples:
  modelpress report --inputs fp32=fp32.eval.json w4=w4.eval.json w4=out/w4 w4=w4.bench.json search-out \\
      --baseline fp32 --html report.html --markdown report.md
inputs: an eval JSON (modelpress eval --json), a compress output folder or its report.json, a bench JSON
(modelpress bench --json), a search folder (modelpress search --out); LABEL=PATH joins files of one model."""


def add_parser(sub: Any) -> None:
    """Register the ``report`` subcommand."""
    r = sub.add_parser("report", help="one self-contained HTML report + Markdown summary with plots",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--inputs", nargs="+", required=True, metavar="[LABEL=]PATH",
                   help="eval JSONs, compress reports or output folders, bench JSONs, search folders")
    r.add_argument("--html", help="write the HTML report here")
    r.add_argument("--markdown", help="write the Markdown summary here (figures as PNG in NAME_files/ beside it)")
    r.add_argument("--baseline", help="label of the reference model (default: the largest on disk)")
    r.add_argument("--title", default="modelpress report")
    r.add_argument("--note", default="", help="a line under the title: where and how the inputs were measured")
    r.add_argument("--price-per-hour", type=A.positive_float, default=1.0,
                   help="machine price per hour, for the cost per million tokens (default 1.0)")


def cmd_report(args: argparse.Namespace) -> int:
    if not args.html and not args.markdown:
        raise ModelpressError("report: pass --html OUT.html and/or --markdown OUT.md")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ModelpressError("modelpress report needs matplotlib: pip install 'modelpress[report]'") from None
    from ..report.inputs import read_inputs
    from ..report.render import ReportOptions, write_report

    inputs = read_inputs(args.inputs)
    opts = ReportOptions(title=args.title, note=args.note, baseline=args.baseline, price_per_hour=args.price_per_hour)
    for p in write_report(inputs, opts, args.html, args.markdown):
        print(f"wrote {p}", file=sys.stderr)
    return 0
