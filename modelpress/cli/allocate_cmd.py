"""``modelpress allocate``: the exact budgeted allocation of a sensitivity table, as a recipe YAML.

Glue only: reads the table, builds the budget and calls :func:`~modelpress.search.allocate.allocate`
and :func:`~modelpress.search.allocate.allocation_recipe`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from . import args as A


def add_parser(sub: Any) -> None:
    """Register the ``allocate`` subcommand."""
    a = sub.add_parser("allocate", help="per-layer bits / sparsity / rank minimising measured sensitivity under a "
                                        "budget (exact MILP), written as a recipe")
    a.add_argument("--sensitivity", required=True, help="table written by `modelpress sensitivity`")
    b = a.add_mutually_exclusive_group(required=True)
    b.add_argument("--budget-bytes", type=A.positive_int, help="stored bytes of the allocated layers")
    b.add_argument("--budget-bpw", type=A.positive_float, help="average stored bits per weight (scales included)")
    b.add_argument("--budget-sparsity", type=A.share, help="average fraction of weights pruned")
    b.add_argument("--budget-latency", type=A.positive_float, help="seconds, summed from --latency-table")
    a.add_argument("--latency-table", help="JSON {layer: {choice label: seconds}} (with --budget-latency)")
    a.add_argument("--name", default="allocated", help="the recipe's name")
    a.add_argument("--out", required=True, help="recipe YAML to write")


def cmd_allocate(args: argparse.Namespace) -> int:
    import yaml

    from ..pipeline.recipe import parse_recipe
    from ..search import allocate as al
    from ..search.sensitivity import SensitivityTable

    table = SensitivityTable.load(args.sensitivity)
    alloc = al.allocate(table, _budget(args, al))
    recipe = parse_recipe(al.allocation_recipe(table, alloc, args.name), args.out)  # checked like any recipe
    Path(args.out).write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    print(f"wrote {args.out}: {al.summary(table, alloc)}", file=sys.stderr)
    return 0


def _budget(args: argparse.Namespace, al: Any) -> Any:
    from ..core.errors import ModelpressError

    if args.budget_bytes is not None:
        return al.ByteBudget(args.budget_bytes)
    if args.budget_bpw is not None:
        return al.BitsBudget(args.budget_bpw)
    if args.budget_sparsity is not None:
        return al.SparsityBudget(args.budget_sparsity)
    if not args.latency_table:
        raise ModelpressError("--budget-latency needs --latency-table FILE.json")
    return al.LatencyBudget(args.budget_latency, json.loads(Path(args.latency_table).read_text()))
