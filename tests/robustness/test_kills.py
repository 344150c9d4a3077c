"""E. SIGKILL at every checkpoint and inside saving, then the same command again.

The killed runs are real processes: ``_driver.py --batch`` forks one child per kill point, and the
child SIGKILLs itself from inside a checkpoint / saving function (no ``finally``, no atexit). One
driver start serves every kill point (the torch / transformers imports cost seconds). The rerun
(in-process) must succeed and give the files of an uninterrupted run (report.json / report.md hold
timings), leave no temporary folder beside the output and leave the user's files alone. A checkpoint
of another model at the same path must not be spliced into the result.
"""
from __future__ import annotations

import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest

from .support import (Job, assert_ok, assert_unchanged, build_model_dir, calib_args, digest_diff,
                      gptq_recipe_name, hidden_leftovers, make_user_area, output_digest, run_batch, run_main,
                      snapshot)

BLOCKS = 3

KILLS = {
    "after-checkpoint-1": "checkpoint:after:1:kill",
    "after-checkpoint-2": "checkpoint:after:2:kill",
    "after-last-checkpoint": f"checkpoint:after:{BLOCKS}:kill",
    "saving-started": "save:before:1:kill",
    "saving-written-not-renamed": "save:after:1:kill",
}


def _argv(model: Path, text: Path, out: Path) -> list:
    return ["compress", "--model", model, "--recipe", gptq_recipe_name(), *calib_args(text), "--output", out]


@dataclass
class Case:
    job: Job
    area: Path
    out: Path
    before: dict[str, str]
    names: set[str]
    model: Path


@pytest.fixture(scope="module")
def kill_model(tmp_path_factory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("kill_model") / "llama3", layers=BLOCKS)


@pytest.fixture(scope="module")
def reference(kill_model, text_file, tmp_path_factory) -> dict[str, str]:
    """Digest of an uninterrupted in-process run."""
    out = tmp_path_factory.mktemp("kill_reference") / "out"
    assert run_main(*_argv(kill_model, text_file, out)) == 0
    return output_digest(out)


@pytest.fixture(scope="module")
def killed(kill_model, text_file, tmp_path_factory) -> dict[str, Case]:
    """Every kill point (plus an uninterrupted control and the model-swap case) run in one driver batch."""
    root = tmp_path_factory.mktemp("kills")
    cases: dict[str, Case] = {}
    faults = {**KILLS, "control-no-fault": None, "swap": "checkpoint:after:1:kill"}
    for name, fault in faults.items():
        area = make_user_area(root / name / "area")
        model = kill_model if name != "swap" else build_model_dir(root / name / "model", seed=0, layers=BLOCKS)
        out = area / "out"
        before, names = snapshot(area), {p.name for p in area.iterdir()}
        cases[name] = Case(Job(_argv(model, text_file, out), area, fault), area, out, before, names, model)
    run_batch([c.job for c in cases.values()], root / "_batch")
    return cases


def _assert_killed(case: Case) -> None:
    j = case.job
    assert j.rc != 97, j.stderr  # the hook point moved: update _driver.py
    assert j.rc == -signal.SIGKILL, f"the run should have been killed at {j.fault}, but it exited {j.rc}:\n" \
                                    f"{j.stderr[-3000:]}"


def _assert_clean_success(case: Case) -> None:
    left = hidden_leftovers(case.area, case.names)
    assert not left, f"temporary entries left beside the output: {left}"
    assert not Path(f"{case.out}.work").exists(), "the working folder is still there after success"
    assert_unchanged(case.before, snapshot(case.area), allow=[case.out.name])


def test_uninterrupted_process_matches_in_process(killed, reference):
    """Guard of the tests below: a driver child without a fault gives the reference files."""
    c = killed["control-no-fault"]
    assert c.job.rc == 0, c.job.stderr[-3000:]
    diff = digest_diff(reference, output_digest(c.out))
    assert not diff, "a separate process gives other files than the in-process run:\n  " + "\n  ".join(diff)


@pytest.mark.parametrize("point", list(KILLS))
def test_kill_then_rerun_equals_uninterrupted(point, killed, reference, cli):
    case = killed[point]
    _assert_killed(case)
    assert_ok(cli(*case.job.argv))
    diff = digest_diff(reference, output_digest(case.out))
    assert not diff, "the resumed run's files differ from an uninterrupted run's:\n  " + "\n  ".join(diff)
    _assert_clean_success(case)


def test_model_replaced_after_kill_is_not_spliced(killed, text_file, cli, tmp_path):
    """Killed after block 0 of model A; model B now sits at the same path: the rerun gives B's result."""
    case = killed["swap"]
    _assert_killed(case)
    shutil.rmtree(case.model)
    build_model_dir(case.model, seed=1, layers=BLOCKS)
    assert_ok(cli(*case.job.argv))
    fresh = tmp_path / "fresh" / "out"
    assert_ok(cli(*_argv(case.model, text_file, fresh)))
    diff = digest_diff(output_digest(fresh), output_digest(case.out))
    assert not diff, "the rerun spliced checkpointed blocks of the replaced model:\n  " + "\n  ".join(diff)
    _assert_clean_success(case)
