"""B. Every numeric option of every subcommand, at 0, -1, 10**12 and wrong-typed values.

Rows come from ``build_parser()``: a new int/float option gets its rows without editing this file.
Each value either works or is refused as a one-line user error (exit 2); the values that make no
sense (a count of 0, a window of one token, a negative seed ...) must be refused. ``bench`` never
measures here: its measuring and model loading are stubbed, and a refusal must come before them.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Iterator

import pytest

from modelpress.cli.main import build_parser

from .support import (assert_nothing_half_written, assert_ok_or_user_error, assert_user_error, calib_args,
                      gptq_recipe_name, patch_everywhere)

HUGE = str(10**12)

#: Counts and lengths: 0 and negative values are refused.
POSITIVE = {
    "compress": {"--calib-samples", "--calib-seq-len", "--eval-max-tokens", "--eval-seq-len", "--eval-stride"},
    "eval": {"--max-tokens", "--seq-len", "--stride", "--limit", "--batch-tokens"},
    "bench": {"--threads", "--batches", "--prompt-len", "--new-tokens", "--bandwidth-mib"},
}
#: Windows: one token predicts nothing, so 1 is refused too.
WINDOWS = {("compress", "--calib-seq-len"), ("compress", "--eval-seq-len"), ("eval", "--seq-len")}
#: Non-negative options: -1 is refused.
NON_NEGATIVE = {("compress", "--calib-seed")}


def _numeric_type(act: argparse.Action) -> type | None:
    """int or float when the option parses numbers (``type=int`` or a checking callable such as
    ``positive_int``), else None."""
    if act.type in (int, float):
        return act.type
    if not callable(act.type) or act.type is str:
        return None
    for probe in ("3", "2.5"):
        try:
            v = act.type(probe)
        except Exception:  # noqa: BLE001  (a probe the type refuses tells nothing)
            continue
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return type(v)
    return None


def numeric_options() -> Iterator[tuple[str, str, type, Any]]:
    """(subcommand, longest option string, int or float, nargs) of every numeric option."""
    ap = build_parser()
    subs = [a for a in ap._actions if isinstance(a, argparse._SubParsersAction)]
    for sub in subs:
        for cmd, p in sub.choices.items():
            for act in p._actions:
                typ = _numeric_type(act) if act.option_strings else None
                if typ is not None:
                    yield cmd, max(act.option_strings, key=len), typ, act.nargs


def rows() -> list[Any]:
    out = []
    for cmd, opt, typ, _nargs in numeric_options():
        values = ["0", "-1", HUGE, "abc"] + (["1.5"] if typ is int else []) + (["1"] if (cmd, opt) in WINDOWS else [])
        for v in values:
            refuse = (v in ("abc", "1.5") or (v in ("0", "-1") and opt in POSITIVE.get(cmd, ()))
                      or (v == "1" and (cmd, opt) in WINDOWS) or (v == "-1" and (cmd, opt) in NON_NEGATIVE))
            out.append(pytest.param(cmd, opt, v, refuse, id=f"{cmd}{opt}={v}-{'refused' if refuse else 'either'}"))
    return out


def test_rows_cover_the_named_options():
    """The refusal lists name real options (a renamed option would otherwise drop its rows silently)."""
    have = {(c, o) for c, o, _t, _n in numeric_options()}
    named = {(c, o) for c, opts in POSITIVE.items() for o in opts} | WINDOWS | NON_NEGATIVE
    assert named <= have, f"options named here but not in the parser: {sorted(named - have)}"


def _with_option(base: list[str], opt: str, value: str) -> list[str]:
    """``base`` without ``opt`` (and its value), then ``opt=value`` (so '-1' is never read as a flag)."""
    out, skip = [], False
    for a in base:
        if skip:
            skip = False
            continue
        if a == opt:
            skip = True
            continue
        if a.startswith(opt + "="):
            continue
        out.append(a)
    return out + [f"{opt}={value}"]


class _Measured(BaseException):
    """bench went past argument checking: it started loading or measuring."""


@pytest.fixture
def bench_stubbed(monkeypatch):
    """bench's measuring and model loading raise :class:`_Measured` instead of running."""
    import modelpress.api as api
    import modelpress.cli.bench_cmd  # noqa: F401
    import modelpress.eval.perf as perf
    import modelpress.models.loading as loading

    reached: list[str] = []

    def stub(name):
        def f(*_a, **_k):
            reached.append(name)
            raise _Measured(name)
        return f

    for mod, name in ((perf, "measure_bandwidth"), (perf, "measure_in_subprocess"), (perf, "profile_model"),
                      (api, "load"), (loading, "load_model")):
        if hasattr(mod, name):
            patch_everywhere(monkeypatch, getattr(mod, name), stub(name), ("modelpress",))
    return reached


#: Commands whose work grows with a valid number without bound (``adapt --steps=10**12`` trains for
#: ever): their HUGE rows are not run. Reported as xfail, so the gap stays visible.
UNBOUNDED_WORK = {"adapt", "search", "sensitivity"}


@pytest.fixture(scope="module")
def extra_inputs(model_dir: Path, text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Inputs the newer commands need: a sensitivity table (allocate), a search space (search)."""
    from .support import run_main

    d = tmp_path_factory.mktemp("robust_extra")
    sens = d / "sens.json"
    assert run_main("sensitivity", "--model", model_dir, "--bits", "4", "8", "--group", "32", "--calib", text_file,
                    "--calib-samples", "2", "--calib-seq-len", "32", "--measure-tokens", "16", "--json", sens) == 0
    space = d / "space.yaml"
    space.write_text("params:\n  bits: {choices: [4, 8]}\nstages:\n"
                     "  - {method: rtn, ignore: [lm_head], format: {type: int, bits: $bits, granularity: 32}}\n")
    return {"sens": sens, "space": space}


def _base(cmd: str, model_dir: Path, text_file: Path, compressed_dir: Path, out: Path,
          extra: dict[str, Path] | None = None) -> list[str]:
    extra = extra or {}
    bases = {
        "adapt": ["adapt", "--model", model_dir, "--method", "lora", "--data", text_file, "--steps", "1",
                  "--batch-size", "1", "--seq-len", "16", "--output", out],
        "sensitivity": ["sensitivity", "--model", model_dir, "--bits", "4", "--group", "32", "--calib", text_file,
                        "--calib-samples", "2", "--calib-seq-len", "32", "--measure-tokens", "16",
                        "--json", out.parent / "sens.json"],
        "allocate": ["allocate", "--sensitivity", extra.get("sens", out), "--budget-bpw", "6", "--out",
                     out.parent / "mixed.yaml"],
        "search": ["search", "--model", model_dir, "--space", extra.get("space", out), "--trials", "1",
                   "--storage", f"sqlite:///{out.parent / 'study.db'}", "--study", "s", "--out", out,
                   "--calib", text_file, "--calib-samples", "2", "--calib-seq-len", "32", "--eval-data", text_file,
                   "--eval-max-tokens", "64", "--eval-seq-len", "32", "--latency-prompt", "4", "--latency-tokens", "2"],
        "report": ["report", "--inputs", f"w4={compressed_dir}", "--html", out.parent / "r.html",
                   "--markdown", out.parent / "r.md"],
        "compress": ["compress", "--model", model_dir, "--recipe", gptq_recipe_name(), *calib_args(text_file),
                     "--eval-data", text_file, "--eval-max-tokens", "256", "--eval-seq-len", "64", "--output", out],
        "eval": ["eval", "--model", model_dir, "--data", text_file, "--max-tokens", "256", "--seq-len", "64"],
        "bench": ["bench", "--model", model_dir, "--same-process"],
        "export": ["export", "--model", compressed_dir, "--format", "hf", "--output", out],
        "inspect": ["inspect", "--model", model_dir],
        "recipes": ["recipes"],
        "generate": ["generate", "--model", model_dir, "--from-docs", text_file, "--samples", "2",
                     "--max-new-tokens", "4", "--output", out.parent / "generated.jsonl"],
    }
    if cmd not in bases:
        pytest.fail(f"no base command for subcommand {cmd!r}: add one to _base() in {__file__}")
    return [str(a) for a in bases[cmd]]


@pytest.mark.parametrize("cmd", ["adapt", "sensitivity", "allocate", "search", "report"])
def test_base_command_succeeds(cmd, cli, model_dir, text_file, compressed_dir, tmp_path, extra_inputs):
    """The rows below change one option of these commands: unchanged, each must succeed (else every
    'either' row would pass on an unrelated user error)."""
    res = cli(*_base(cmd, model_dir, text_file, compressed_dir, tmp_path / "out", extra_inputs))
    assert res.rc == 0, res.describe()


@pytest.mark.parametrize("cmd, opt, value, refuse", rows())
def test_numeric_option(cmd, opt, value, refuse, cli, model_dir, text_file, compressed_dir, tmp_path, request):
    out = tmp_path / "out"
    if value == HUGE and not refuse and cmd in UNBOUNDED_WORK:
        pytest.xfail(f"{cmd} {opt}={HUGE} is valid and would run for hours: not exercised (no cap yet)")
    extra = request.getfixturevalue("extra_inputs") if cmd in ("allocate", "search") else None
    argv = _with_option(_base(cmd, model_dir, text_file, compressed_dir, out, extra), opt, value)
    reached = request.getfixturevalue("bench_stubbed") if cmd == "bench" else []
    try:
        res = cli(*argv)
    except _Measured:
        res = None
    if reached:  # bench accepted the value and went on to load / measure (stubbed)
        assert not refuse, f"bench {opt}={value} must be refused before any model is loaded or measured; " \
                           f"it reached {reached[0]}"
        return
    assert res is not None
    clean = (lambda: assert_nothing_half_written(out, [])) if cmd in ("compress", "export") else None
    if refuse:
        assert_user_error(res, after=clean)
    else:
        assert_ok_or_user_error(res, after=clean)
