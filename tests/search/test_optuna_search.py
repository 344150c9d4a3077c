"""modelpress search: a study killed mid-way resumes to exactly N measured trials without redoing any,
the Pareto front is the brute-force non-dominated set, parallel workers share one study, and bad
storage URLs, spaces and mismatched studies are refused by name."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from modelpress.cli.main import main  # noqa: E402
from modelpress.core.errors import ModelpressError  # noqa: E402
from modelpress.search.objectives import OBJECTIVES, EvalSettings  # noqa: E402
from modelpress.search.optuna_search import SearchConfig, open_study  # noqa: E402
from modelpress.search.space import parse_space  # noqa: E402

SPACE = """
name: tiny
params:
  method: {choices: [rtn, gptq]}
  bits: {choices: [2, 3, 4, 8]}
  group: {choices: [32, 64]}
  sparsity: {low: 0.0, high: 0.5, step: 0.25}
stages:
  - {method: magnitude, when: sparsity, ignore: [lm_head], pattern: unstructured, sparsity: $sparsity}
  - {method: $method, ignore: [lm_head], format: {type: int, bits: $bits, granularity: $group}}
"""


@pytest.fixture()
def space_file(tmp_path: Path) -> Path:
    p = tmp_path / "space.yaml"
    p.write_text(SPACE)
    return p


def _cmd(model: Path, text: Path, space: Path, db: Path, out: Path, trials: int, study: str = "s") -> list[str]:
    return [sys.executable, "-m", "modelpress.cli.main", "--quiet", "search", "--model", str(model), "--space", str(space),
            "--trials", str(trials), "--storage", f"sqlite:///{db}", "--study", study, "--out", str(out),
            "--calib", str(text), "--calib-samples", "4", "--calib-seq-len", "64", "--eval-data", str(text),
            "--eval-max-tokens", "512", "--eval-seq-len", "128", "--latency-prompt", "8", "--latency-tokens", "4",
            "--heartbeat", "2"]


def _env() -> dict[str, str]:
    return os.environ | {"MODELPRESS_PROGRESS": "0", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                         "PYTHONWARNINGS": "ignore"}


def _trials(db: Path, study: str = "s") -> list:
    return optuna.load_study(study_name=study, storage=f"sqlite:///{db}").get_trials(deepcopy=False)


def _measured(trials: list) -> list:
    return [t for t in trials if t.state.name == "COMPLETE" and "reused_from" not in t.user_attrs]


def _front_brute_force(records: list[dict]) -> set[int]:
    pts = {r["number"]: [r["objectives"][k] for k in OBJECTIVES] for r in records
           if r["state"] == "COMPLETE" and "reused_from" not in r}
    front = set()
    for n, p in pts.items():
        beaten = any(all(a <= b for a, b in zip(q, p)) and any(a < b for a, b in zip(q, p))
                     for m, q in pts.items() if m != n)
        if not beaten:
            front.add(n)
    return front


def test_killed_study_resumes_to_exactly_n_without_redoing_work(tiny_llama_dir: Path, tiny_text_file: Path,
                                                               space_file: Path, tmp_path: Path) -> None:
    db, out, n = tmp_path / "study.db", tmp_path / "out", 6
    proc = subprocess.Popen(_cmd(tiny_llama_dir, tiny_text_file, space_file, db, out, n), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # >= 2 measured and the next one under way
        measured, running = _peek(db)
        if measured >= 2 and running:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the search ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = {t.number: tuple(t.values) for t in _measured(_trials(db))}
    killed = [t.number for t in _trials(db) if t.state.name == "RUNNING"]
    assert 2 <= len(first) < n and killed  # killed in the middle of a trial

    r = subprocess.run(_cmd(tiny_llama_dir, tiny_text_file, space_file, db, out, n), env=_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    trials = _trials(db)
    measured = _measured(trials)
    assert len(measured) == n  # exactly N measured trials, those of the first run included
    assert {t.number: tuple(t.values) for t in measured if t.number in first} == first  # kept, not redone
    assert len([t for t in measured if t.number not in first]) == n - len(first)
    params = [tuple(sorted(t.params.items())) for t in measured]
    assert len(set(params)) == len(params)  # no recipe measured twice
    by_number = {t.number: t for t in trials}
    for k in killed:  # the trial the kill interrupted was failed by its missing heartbeat and queued again
        assert by_number[k].state.name == "FAIL"
        retries = [t for t in trials if t.system_attrs.get("failed_trial") == k]
        assert retries and retries[0].state.name == "COMPLETE"
        assert by_number[k].params.items() <= retries[0].params.items()  # what it had drawn is kept
    ran = {int(p.name) for p in (out / "trials").iterdir() if (p / "eval.json").exists()}
    assert {t.number for t in measured} <= ran and ran - {t.number for t in measured} <= set(killed)

    res = json.loads((out / "search.json").read_text())
    assert set(res["pareto"]) == _front_brute_force(res["trials"]) and res["pareto"]
    assert res["counts"]["COMPLETE"] == n
    md = (out / "search.md").read_text()
    for num in res["pareto"]:
        assert f"| {num} |" in md

    again = subprocess.run(_cmd(tiny_llama_dir, tiny_text_file, space_file, db, out, n), env=_env(),
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(_trials(db)) == len(trials)  # a finished study reruns nothing


def _peek(db: Path) -> tuple[int, bool]:
    """(measured trials, whether a trial holding all 4 parameters is running), read with plain sqlite3: opening
    the storage with optuna here would race the worker creating its tables."""
    import sqlite3

    if not db.exists():
        return 0, False
    con = sqlite3.connect(db, timeout=5)
    try:
        rows = con.execute("SELECT t.state, (SELECT count(*) FROM trial_params p WHERE p.trial_id = t.trial_id), "
                           "(SELECT count(*) FROM trial_user_attributes a WHERE a.trial_id = t.trial_id AND "
                           "a.key = 'reused_from') FROM trials t").fetchall()
    except sqlite3.OperationalError:  # tables not created yet
        return 0, False
    finally:
        con.close()
    return sum(s == "COMPLETE" and not r for s, _, r in rows), any(s == "RUNNING" and p == 4 for s, p, _ in rows)


def test_parallel_workers_share_one_study(tiny_llama_dir: Path, tiny_text_file: Path, space_file: Path,
                                          tmp_path: Path) -> None:
    db, out, n = tmp_path / "study.db", tmp_path / "out", 4
    procs = [subprocess.Popen(_cmd(tiny_llama_dir, tiny_text_file, space_file, db, out, n), env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    trials = _trials(db)
    measured = _measured(trials)
    assert n <= len(measured) <= n + 1  # the stop test and the next ask are not one transaction
    assert len({tuple(sorted(t.params.items())) for t in measured}) == len(measured)
    assert all((out / "trials" / f"{t.number:04d}" / "eval.json").is_file() for t in measured)
    assert not [t for t in trials if t.state.name == "RUNNING"]


def _dead_worker_study(tmp_path: Path) -> object:
    """A study on a storage with a 1 s heartbeat (stale after 2 s), as a search worker opens it."""
    from modelpress.search.optuna_search import open_storage

    return optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 'dead.db'}", heartbeat_s=1),
                               study_name="s", directions=["minimize"] * len(OBJECTIVES))


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_running_trial_killed_before_its_first_heartbeat_goes_stale(tmp_path: Path) -> None:
    """Optuna writes a trial's first beat only after creating it RUNNING; a worker killed in between left a
    trial that optuna deems alive for ever, and the resumed search slept on it until CI's timeout."""
    from modelpress.search.optuna_search import _counts

    study = _dead_worker_study(tmp_path)
    trial = study.ask()
    trial.suggest_categorical("bits", [2, 3])  # the worker died here: no heartbeat was ever written
    assert _counts(study)["RUNNING"] == 1  # not yet past the grace period: alive
    time.sleep(2.5)
    states = _counts(study)
    assert states["FAIL"] == 1 and states["RUNNING"] == 0
    retry = [t for t in study.get_trials(deepcopy=False) if t.system_attrs.get("failed_trial") == trial.number]
    assert retry and retry[0].state.name == "WAITING"  # its parameters queued again, as for a missed beat


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_twin_whose_worker_died_is_not_waited_for_for_ever(tmp_path: Path) -> None:
    """A trial drawing the parameters of an earlier trial that is RUNNING waits for its numbers; when that
    earlier trial's worker is dead the wait must end once its heartbeat is stale."""
    import threading

    from modelpress.search.optuna_search import _measured_twin

    study = _dead_worker_study(tmp_path)
    dead = study.ask()
    dead.suggest_categorical("bits", [2, 3])
    study._storage.record_heartbeat(dead._trial_id)  # it beat once, then its process was killed
    study.enqueue_trial(dead.params)
    later = study.ask()
    later.suggest_categorical("bits", [2, 3])
    assert later.params == dead.params
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(_measured_twin(later, 0.2)), daemon=True)
    waiter.start()
    waiter.join(timeout=30)
    assert not waiter.is_alive(), "the wait for a dead twin never ended"
    assert got == [None]  # nothing measured: the later trial compresses the recipe itself
    assert study.trials[dead.number].state.name == "FAIL"


@pytest.mark.parametrize("url,needle", [
    ("sqlite:////nonexistent-dir-mp/sub/study.db", "folder /nonexistent-dir-mp/sub does not exist"),
    ("nosuchdialect://user:secret@host/db", "nosuchdialect://user:***@host/db"),
    ("not a url", "not a url"),
])
def test_bad_storage_url_is_named(url: str, needle: str, space_file: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["search", "--model", "/nonexistent/model", "--space", str(space_file), "--trials", "2",
               "--storage", url, "--study", "s", "--out", "/tmp/unused-mp-search"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "cannot open search storage" in err and needle in err
    assert "secret" not in err  # the password is never printed


def test_study_created_for_another_space_is_refused(tmp_path: Path) -> None:
    import yaml

    a = parse_space(yaml.safe_load(SPACE), "a.yaml")
    b = parse_space(yaml.safe_load(SPACE.replace("[2, 3, 4, 8]", "[3, 4]")), "b.yaml")
    ev = EvalSettings(model="m")
    common = dict(evaluation=ev, trials=2, storage=f"sqlite:///{tmp_path / 'x.db'}", study="s", out=tmp_path)
    open_study(SearchConfig(space=a, **common))
    open_study(SearchConfig(space=a, **common))  # the same space continues
    with pytest.raises(ModelpressError, match="created with another space"):
        open_study(SearchConfig(space=b, **common))


@pytest.mark.parametrize("edit,needle", [
    (("[2, 3, 4, 8]", "[2, 9]"), "bits"),
    (("sparsity: $sparsity}", "sparsity: $sparsityy}"), "$sparsityy, which is not a parameter"),
    (("when: sparsity", "when: nope"), "when names 'nope'"),
    (("{low: 0.0, high: 0.5, step: 0.25}", "{low: 0.5, high: 0.5}"), "low < high"),
    (("  group: {choices: [32, 64]}\n", "  group: {choices: [32, 64]}\n  unused: {choices: [1]}\n"),
     "unused appear in no stage"),
])
def test_bad_space_is_refused_when_read(edit: tuple[str, str], needle: str) -> None:
    import yaml

    with pytest.raises(ModelpressError) as e:
        parse_space(yaml.safe_load(SPACE.replace(*edit)), "space.yaml")
    assert needle in str(e.value) and "space.yaml" in str(e.value)


def test_space_builds_ordinary_recipes() -> None:
    import yaml

    space = parse_space(yaml.safe_load(SPACE), "space.yaml")
    plain = space.recipe({"method": "rtn", "bits": 4, "group": 64, "sparsity": 0.0})
    assert [s.method for s in plain.stages] == ["rtn"]  # 'when: sparsity' drops the stage at 0
    assert plain.stages[0].format.bits == 4
    pruned = space.recipe({"method": "gptq", "bits": 3, "group": 32, "sparsity": 0.25})
    assert [s.method for s in pruned.stages] == ["magnitude", "gptq"] and pruned.stages[0].sparsity == 0.25
