"""CLI subcommand handlers: parse-free glue from argparse namespaces to :mod:`modelpress.api`."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ..core.errors import ModelpressError
from .output import write_json

console = Console(stderr=True)  # sys.stderr as it is at each write, not at import


def _eval_kwargs(args: argparse.Namespace, prefix: str = "") -> dict[str, Any]:
    g = lambda k: getattr(args, prefix + k)  # noqa: E731
    return {"seq_len": g("seq_len"), "max_tokens": g("max_tokens"), "stride": g("stride"),
            "join_lines": True if args.join_lines else None}  # None: the source's own default


def _check_paths(out: Path, workdir: Path) -> None:
    """The working folder must not be the output or inside it (the output is replaced as a whole)."""
    o, w = out.resolve(), workdir.resolve()
    if w == o or o in w.parents:
        raise ModelpressError(f"--workdir {workdir} is inside the output folder {out}; choose a folder outside it")


def cmd_compress(args: argparse.Namespace) -> int:
    from .. import api
    from ..core.outputs import check_replaceable
    from ..data.sources import DEFAULT_CALIBRATION, check_source

    out = Path(args.output)
    workdir = Path(args.workdir) if args.workdir else Path(f"{out}.work")
    check_replaceable(out, args.overwrite)  # everything the user can get wrong fails before the slow load
    _check_paths(out, workdir)
    recipe = api.as_recipe(args.recipe)
    calib_spec = args.calib or (DEFAULT_CALIBRATION if api.needs_calibration(recipe) else None)
    train_spec = (args.train or calib_spec or DEFAULT_CALIBRATION) if api.needs_training(recipe) else None
    for spec, what in ((calib_spec, "calibration file"), (args.eval_data, "--eval-data file"),
                       (args.train, "--train file")):
        if spec:
            check_source(spec, what)
    if args.low_memory and args.eval_data:
        raise ModelpressError("--low-memory cannot evaluate the float baseline (it never holds the whole model); "
                              "drop --eval-data and run `modelpress eval` on the output")
    t0 = time.perf_counter()
    lm = api.load(args.model, trust_remote_code=args.trust_remote_code, low_memory=args.low_memory)
    load_s = time.perf_counter() - t0
    samples, seq_len = calibration_size(args, recipe)
    calib = api.calibration_for(lm, calib_spec, samples, seq_len, args.calib_seed,
                                args.calib_chat) if calib_spec else None
    train = api.training_for(lm, train_spec, args.train_samples, args.train_seq_len, args.calib_seed) \
        if train_spec else None
    ev = {f"eval_{k}": v for k, v in _eval_kwargs(args, "eval_").items()}
    report = api.compress(lm, recipe, calib=calib, workdir=workdir, remove_workdir_if_empty=args.workdir is None,
                          offload_activations=args.offload_activations or args.low_memory,
                          eval_data=args.eval_data, train=train, matmul_precision=args.matmul_precision, **ev)
    report["load_s"] = load_s
    if calib_spec and not args.calib:
        report["warnings"].insert(0, f"calibrated on {calib_spec}, the text shipped with modelpress; pass --calib for your own data")
    path = api.save(lm, out, recipe=recipe, report=report, overwrite=args.overwrite)
    report = json.loads((path / "report.json").read_text())  # with the saved files' size on disk
    _print_layers(report["layers"])
    for w in report["warnings"]:
        console.print(f"[yellow]note:[/] {w}")
    console.print(f"saved {path} (compress {report['compress_s']:.1f}s, peak RSS {report['peak_rss_bytes'] / 2**20:.0f} MiB)")
    if report.get("eval", {}).get("delta_ppl_pct") is not None:
        e = report["eval"]
        console.print(f"perplexity {e['baseline']['perplexity']:.4f} -> {e['compressed']['perplexity']:.4f} ({e['delta_ppl_pct']:+.2f}%)")
        if e.get("size_bytes_ratio") is not None:
            console.print(f"size on disk {e['baseline']['size_bytes'] / 2**20:.1f} MiB -> "
                          f"{e['compressed']['size_bytes'] / 2**20:.1f} MiB ({e['size_bytes_ratio']:.3f}x)")
    return 0


def calibration_size(args: argparse.Namespace, recipe: Any) -> tuple[int, int]:
    """(windows, tokens per window): the flags, else the recipe's ``calibration``, else 128 x 2048."""
    from ..calib.data import DEFAULT_CALIB_SAMPLES, DEFAULT_CALIB_SEQ_LEN  # torch: not at CLI import

    size = recipe.calibration
    return (args.calib_samples or size.samples or DEFAULT_CALIB_SAMPLES,
            args.calib_seq_len or size.seq_len or DEFAULT_CALIB_SEQ_LEN)


def _print_layers(layers: list[dict[str, Any]], limit: int = 400) -> None:
    if not layers:
        return
    t = Table(title="per-layer result", show_lines=False)
    t.add_column("layer", overflow="fold")  # the whole name, wrapped: q/k/v differ only at the end
    for col in ("method", "bits/w", "rel. weight err", "rel. output err"):
        t.add_column(col)
    for r in layers[:limit]:
        f = lambda v, n=4: "-" if v is None else f"{v:.{n}f}"  # noqa: E731
        t.add_row(r["name"], r["method"], f(r.get("bits_per_weight"), 3), f(r.get("rel_error")), f(r.get("out_rel_error")))
    console.print(t)


def cmd_eval(args: argparse.Namespace) -> int:
    from .. import api
    from ..core.progress import track
    from ..data.sources import DEFAULT_EVALUATION, check_source
    from ..eval.report import comparison, delta_pct, markdown
    from ..eval.suite import evaluate_beyond_ppl, markdown_lines, read_plan_inputs

    plan = _eval_plan(args)
    beyond = bool(plan.tasks or plan.behaviour or plan.lm_eval)
    data = args.data or (None if beyond else DEFAULT_EVALUATION)  # tasks alone: no perplexity unless --data
    for spec in filter(None, (data, args.data)):
        check_source(spec, "data file")
    read_plan_inputs(plan)  # a bad task or suite file fails before the slow model load
    lm = api.load(args.model, trust_remote_code=args.trust_remote_code)
    base = api.load(args.baseline, trust_remote_code=args.trust_remote_code) if args.baseline else None
    res: dict[str, Any] = api.evaluate(lm, data, **_eval_kwargs(args)) if data else {"model": lm.source}
    if base is not None and data:
        res["baseline"] = api.evaluate(base, data, **_eval_kwargs(args))
        res["delta_ppl_pct"] = delta_pct(res["perplexity"], res["baseline"]["perplexity"])
    if beyond or base is not None:
        res.update(evaluate_beyond_ppl(lm, plan, base, progress=track))
    if args.json_out:
        write_json(args.json_out, res)
    if args.markdown:
        rep = {"model": args.model, "eval": comparison(res.get("baseline"), res)} if data else {"model": args.model}
        Path(args.markdown).write_text(markdown(rep) + "\n".join(markdown_lines(res)))
    keys = ("perplexity", "tokens", "seq_len", "params", "size_bytes", "delta_ppl_pct")
    summary = {k: res[k] for k in keys if k in res}
    summary.update({f"{t}.{m}": v[m] for t, v in res.get("tasks", {}).items()
                    for m in ("acc", "acc_norm", "exact_match", "flip_rate") if m in v})
    summary.update({f"agreement.{k}": res["agreement"][k] for k in ("kl", "top1_agreement")} if "kl" in res.get("agreement", {}) else {})
    print(json.dumps(summary))
    return 0


def _eval_plan(args: argparse.Namespace) -> Any:
    from ..data.sources import DEFAULT_EVALUATION
    from ..eval.suite import AGREEMENT_TOKENS, EvalPlan

    return EvalPlan(tasks=tuple(args.tasks), behaviour=args.behaviour, lm_eval=tuple(args.lm_eval), limit=args.limit,
                    agreement_text=args.data or DEFAULT_EVALUATION, agreement_tokens=args.max_tokens or AGREEMENT_TOKENS,
                    seq_len=args.seq_len, join_lines=True if args.join_lines else None, token_budget=args.batch_tokens)


def cmd_inspect(args: argparse.Namespace) -> int:
    from .. import api
    from ..models.archspec import role_of
    from ..models.layers import named_linears

    lm = api.load(args.model, trust_remote_code=args.trust_remote_code)
    rows = []
    for name, m in named_linears(lm.module):
        fmt = m.fmt.to_dict() if hasattr(m, "fmt") else {"type": str(next(m.parameters()).dtype).replace("torch.", "")}
        shape = [m.out_features, m.in_features] if hasattr(m, "out_features") else list(m.weight.shape)
        rows.append({"name": name, "role": role_of(name, lm.module, lm.spec), "type": type(m).__name__,
                     "shape": shape, "params": shape[0] * shape[1], "format": fmt})
    from ..eval.size import count_params, memory_bytes

    summary = {"model": lm.source, "kind": lm.kind, "arch": lm.spec.name if lm.spec else "generic",
               "params": count_params(lm.module), "memory_bytes": memory_bytes(lm.module), "linears": len(rows)}
    _print_inspect(summary, rows)
    if args.json_out:
        write_json(args.json_out, {"summary": summary, "layers": rows})
    return 0


def _print_inspect(summary: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    out = Console()
    t = Table(title=f"{summary['model']} ({summary['arch']}, {summary['params']:,} params, {summary['memory_bytes'] / 2**20:.1f} MiB)")
    t.add_column("layer", overflow="fold")
    for col in ("role", "type", "shape", "params", "format"):
        t.add_column(col)
    for r in rows:
        fmt = ", ".join(f"{k}={v}" for k, v in r["format"].items())
        t.add_row(r["name"], r["role"] or "-", r["type"], "x".join(map(str, r["shape"])), f"{r['params']:,}", fmt)
    out.print(t)


def cmd_recipes(args: argparse.Namespace) -> int:
    from ..pipeline.recipe import builtin_recipes, load_recipe

    recipes = builtin_recipes()
    if args.name:
        if args.name not in recipes:
            raise ModelpressError(f"no built-in recipe {args.name!r}; built-ins: {', '.join(recipes)}")
        print(recipes[args.name].read_text(), end="")
        return 0
    t = Table(title="built-in recipes")
    t.add_column("name")
    t.add_column("description")
    for name in recipes:
        t.add_row(name, load_recipe(name).description)
    Console().print(t)
    return 0
