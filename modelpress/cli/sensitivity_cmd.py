"""``modelpress sensitivity``: per-layer measured sensitivity (and its proxy) as a JSON table.

Glue only: loads the model and the calibration windows, builds the choices and calls
:func:`~modelpress.search.sensitivity.measure_sensitivity`.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from . import args as A

EXAMPLES = """examples:
  modelpress sensitivity --model bundled:smollm2-135m-instruct --bits 2 3 4 --json sens.json
  modelpress sensitivity --model M --sparsity 0.5 0.6 0.7 0.8 --algorithm wanda --json sens.json
  modelpress allocate --sensitivity sens.json --budget-bpw 3.25 --out mixed.yaml
  modelpress compress --model M --recipe mixed.yaml --output out"""


def add_parser(sub: Any) -> None:
    """Register the ``sensitivity`` subcommand."""
    s = sub.add_parser("sensitivity", help="measure each layer's sensitivity to bits / sparsity / rank (JSON table)",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--model", required=True, help="hub id, folder, .gguf, llama2.c .bin or bundled:NAME")
    s.add_argument("--trust-remote-code", action="store_true", help="allow a hub model's own Python code")
    s.add_argument("--calib", default="bundled:c4", help="calibration text (default bundled:c4)")
    s.add_argument("--calib-samples", type=A.positive_int, default=8,
                   help="calibration windows: each layer is compressed with their Hessian (default 8)")
    s.add_argument("--calib-seq-len", type=A.window_len, default=256, help="tokens per window (default 256)")
    s.add_argument("--measure-samples", type=A.positive_int, default=1,
                   help="the first windows the KL is measured on (default 1, as the mixed-* stages)")
    s.add_argument("--measure-tokens", type=A.window_len, default=64,
                   help="their first tokens used (default 64): each choice of each layer runs the rest of the model")
    s.add_argument("--calib-seed", type=A.nonneg_int, default=0)
    kind = s.add_mutually_exclusive_group(required=True)
    kind.add_argument("--bits", type=A.positive_int, nargs="+", help="integer widths (symmetric, groups of --group)")
    kind.add_argument("--sparsity", type=A.share, nargs="+", help="unstructured sparsities")
    kind.add_argument("--rank", type=A.positive_int, nargs="+", help="ranks (SVD-LLM)")
    s.add_argument("--group", type=A.positive_int, default=64, help="group size of --bits (default 64)")
    s.add_argument("--algorithm", help="gptq|rtn for --bits (default gptq), sparsegpt|wanda for --sparsity "
                                       "(default sparsegpt)")
    s.add_argument("--targets", nargs="+", default=["re:.*"], help="layer selectors (names, globs, re:, role:)")
    s.add_argument("--ignore", nargs="+", default=["lm_head"])
    s.add_argument("--json", dest="json_out", required=True, help="write the table here")


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from .. import api
    from ..search.sensitivity import measure_sensitivity

    lm = api.load(args.model, trust_remote_code=args.trust_remote_code)
    calib = api.calibration_for(lm, args.calib, args.calib_samples, args.calib_seq_len, args.calib_seed)
    ids = calib.ids[: args.measure_samples, : args.measure_tokens]
    table = measure_sensitivity(lm, ids, _choices(args), stats_ids=calib.ids, targets=args.targets, ignore=args.ignore)
    table.info["calibration"] = calib.info
    table.save(args.json_out)
    rho = table.spearman()["pooled"]
    print(f"wrote {args.json_out}: {len(table.layers)} layers x {len(table.choices)} choices, "
          f"{table.info['cpu_seconds']:.0f} CPU s; proxy Spearman rho {rho if rho is None else round(rho, 3)}",
          file=sys.stderr)
    return 0


def _choices(args: argparse.Namespace) -> list:
    from ..core.errors import ModelpressError
    from ..search.choices import QuantChoice, RankChoice, SparsityChoice

    allowed = {"bits": ("gptq", "rtn"), "sparsity": ("sparsegpt", "wanda"), "rank": (None,)}
    key = "bits" if args.bits else "sparsity" if args.sparsity else "rank"
    algo = args.algorithm or allowed[key][0]
    if algo not in allowed[key]:
        raise ModelpressError(f"--algorithm {algo} does not apply to --{key} (choose from {allowed[key]})")
    if key == "bits":
        return [QuantChoice(b, args.group, algo) for b in args.bits]
    if key == "sparsity":
        return [SparsityChoice(s, algo) for s in args.sparsity]
    return [RankChoice(r) for r in args.rank]
