"""A. What a failure looks like: one line on stderr, the right exit code, never a traceback.

user error -> exit 2 ``modelpress: error: ...``; unexpected failure -> exit 1 ``modelpress: internal
error: ... <log>`` with the traceback in that log (or on stderr with ``--debug``).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from .support import (Job, assert_internal_error, assert_nothing_half_written, assert_user_error, driver_env,
                      make_user_area, patch_everywhere, process_result, run_batch)

INJECTED = "injected internal failure"


def _boom(*_a, **_k):
    raise RuntimeError(INJECTED)


@pytest.fixture
def quantize_fails(monkeypatch):
    """RTN's int quantiser raises: an internal failure deep inside compress."""
    from modelpress.quant.formats import IntFormat

    monkeypatch.setattr(IntFormat, "quantize", _boom)


@pytest.fixture
def perplexity_fails(monkeypatch):
    """The perplexity loop raises, wherever it was imported."""
    from modelpress.eval import perplexity as ppl

    assert patch_everywhere(monkeypatch, ppl.perplexity, _boom, ("modelpress",)) >= 1


def _log_file(line: str, log_dir: Path) -> Path:
    m = re.search(re.escape(str(log_dir)) + r"[^\s'\")]*", line)
    assert m, f"the internal-error line should name a log file under MODELPRESS_LOG_DIR={log_dir}: {line!r}"
    return Path(m.group(0).rstrip(".,;:"))


def test_user_error_is_one_line(cli, model_dir, area):
    before = {p.name for p in area.iterdir()}
    res = cli("compress", "--model", model_dir, "--recipe", "no-such-recipe", "--output", area / "out")
    assert_user_error(res, "no-such-recipe", after=lambda: assert_nothing_half_written(area / "out", before))


@pytest.mark.parametrize("argv", [
    pytest.param([], id="no-subcommand"),
    pytest.param(["frobnicate"], id="unknown-subcommand"),
    pytest.param(["compress"], id="compress-missing-required"),
    pytest.param(["compress", "--model", "{model}", "--recipe", "rtn-w8"], id="compress-missing-output"),
    pytest.param(["compress", "--model", "{model}", "--recipe", "rtn-w8", "--output", "{out}",
                  "--calib-samples", "abc"], id="compress-int-option-abc"),
    pytest.param(["eval", "--model", "{model}", "--data", "{text}", "--no-such-flag"], id="eval-unknown-option"),
    pytest.param(["export", "--model", "{model}", "--format", "onnx", "--output", "{out}"], id="export-bad-choice"),
    pytest.param(["eval", "--model", "{model}", "--data", "{text}", "--seq-len"], id="eval-option-without-value"),
])
def test_argparse_errors_are_one_line(cli, argv, model_dir, text_file, area):
    argv = [a.format(model=model_dir, text=text_file, out=area / "out") for a in argv]
    res = cli(*argv)
    assert_user_error(res)
    assert "usage:" not in res.err


def test_internal_error_is_one_line_with_a_log(cli, model_dir, area, quantize_fails, tmp_path):
    before = {p.name for p in area.iterdir()}
    res = cli("compress", "--model", model_dir, "--recipe", "rtn-w8", "--output", area / "out")
    line = assert_internal_error(res, after=lambda: assert_nothing_half_written(area / "out", before))
    log = _log_file(line, tmp_path / "_logs")
    assert log.is_file(), f"the log file named on the error line does not exist: {log}"
    text = log.read_text()
    assert "Traceback" in text and INJECTED in text, f"the log should hold the traceback:\n{text[:2000]}"


def test_internal_error_in_eval(cli, model_dir, text_file, area, perplexity_fails, tmp_path):
    before = {p.name for p in area.iterdir()}
    res = cli("eval", "--model", model_dir, "--data", text_file, "--seq-len", "64", "--json", area / "e.json")
    line = assert_internal_error(res, after=lambda: assert_nothing_half_written(area / "e.json", before))
    log = _log_file(line, tmp_path / "_logs")
    assert log.is_file() and INJECTED in log.read_text()


def test_debug_flag_prints_the_traceback(cli, model_dir, area, quantize_fails):
    before = {p.name for p in area.iterdir()}
    res = cli("compress", "--model", model_dir, "--recipe", "rtn-w8", "--output", area / "out", debug=True)
    assert res.raised is None, f"--debug should print the traceback, not let it escape main():\n{res.describe()}"
    assert res.rc == 1, f"--debug with an internal failure should exit 1 and print the traceback:\n{res.describe()}"
    assert "Traceback" in res.err and INJECTED in res.err, res.describe()
    assert res.out.strip() == "", res.describe()
    assert_nothing_half_written(area / "out", before)


# -- the same contract in real processes (warnings, logging and progress output included) ----------

@pytest.fixture(scope="module")
def real_runs(model_dir, tmp_path_factory) -> dict[str, tuple[Job, Path, set[str]]]:
    """Three CLI runs in real processes (one driver start, a forked child each)."""
    root = tmp_path_factory.mktemp("real_process")
    logs = root / "logs"
    argvs = {
        "argparse": (["compress", "--model", model_dir, "--recipe", "rtn-w8", "--output", "{out}",
                      "--calib-samples", "x"], None),
        "missing-model": (["compress", "--model", root / "nope", "--recipe", "rtn-w8", "--output", "{out}"], None),
        "internal": (["compress", "--model", model_dir, "--recipe", "rtn-w8", "--output", "{out}"],
                     "internal:before:1:raise"),
    }
    runs = {}
    for name, (argv, fault) in argvs.items():
        area = make_user_area(root / name)
        out = area / "out"
        runs[name] = (Job([str(a).format(out=out) for a in argv], area, fault), out, {p.name for p in area.iterdir()})
    run_batch([j for j, _o, _n in runs.values()], root / "_batch", env=driver_env(MODELPRESS_LOG_DIR=str(logs)))
    runs["logs"] = logs
    return runs


@pytest.mark.parametrize("name, needle", [("argparse", "--calib-samples"), ("missing-model", "not found")])
def test_real_process_user_error(name, needle, real_runs):
    job, out, names = real_runs[name]
    assert_user_error(process_result(job), needle, after=lambda: assert_nothing_half_written(out, names))


def test_real_process_internal_error(real_runs):
    job, out, names = real_runs["internal"]
    assert job.rc != 97, job.stderr
    line = assert_internal_error(process_result(job), after=lambda: assert_nothing_half_written(out, names))
    log = _log_file(line, real_runs["logs"])
    assert log.is_file() and INJECTED in log.read_text()
