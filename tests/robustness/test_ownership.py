"""D. modelpress deletes only what it created: user folders passed as --output / --workdir, the
working folder beside the output, and temporary folders of dead runs.

Every test snapshots the user area (relative path -> sha256) before and after the call.
"""
from __future__ import annotations

import json

from .support import (assert_nothing_half_written, assert_ok, assert_unchanged, assert_user_error,
                      calib_args, free_pid, gptq_recipe_name, hidden_leftovers, snapshot)


def _compress(cli, model_dir, text_file, out, *extra, recipe=None):
    return cli("compress", "--model", model_dir, "--recipe", recipe or gptq_recipe_name(), *calib_args(text_file),
               "--output", out, *extra)


def test_overwrite_refuses_a_folder_that_is_not_a_modelpress_output(cli, model_dir, text_file, area):
    before = snapshot(area)
    names = {p.name for p in area.parent.iterdir()}
    res = _compress(cli, model_dir, text_file, area, "--overwrite")

    def untouched():
        assert_unchanged(before, snapshot(area), what=f"the user's folder passed as --output ({area})")
        assert not hidden_leftovers(area.parent, names)

    assert_user_error(res, str(area), after=untouched)


def test_overwrite_refuses_a_file(cli, model_dir, text_file, area):
    target = area / "thesis.tex"
    before = snapshot(area)
    res = _compress(cli, model_dir, text_file, target, "--overwrite")
    assert_user_error(res, "thesis.tex", after=lambda: assert_unchanged(before, snapshot(area)))


def test_overwrite_replaces_a_modelpress_output(cli, model_dir, text_file, area):
    out = area / "out"
    assert_ok(cli("compress", "--model", model_dir, "--recipe", "rtn-w8", "--output", out))
    before = snapshot(area)
    names = {p.name for p in area.iterdir()}
    res = cli("compress", "--model", model_dir, "--recipe", "rtn-w4-g64", "--output", out, "--overwrite")
    assert_ok(res)
    man = json.loads((out / "modelpress.json").read_text())
    assert man["recipe"]["name"] == "rtn-w4-g64", man["recipe"]
    assert_unchanged(before, snapshot(area), allow=["out"])
    assert not hidden_leftovers(area, names), "the replaced output's old copy was left behind"


def test_workdir_with_user_files_is_left_as_it_was(cli, model_dir, text_file, area, tmp_path):
    """--workdir W: modelpress creates and removes only its own subfolder of W."""
    out = tmp_path / "results" / "out"
    before = snapshot(area)
    res = _compress(cli, model_dir, text_file, out, "--workdir", area)
    assert_ok(res)
    assert_unchanged(before, snapshot(area), what="the --workdir folder")
    assert (out / "modelpress.json").is_file()


def test_workdir_dot_in_the_user_area(cli, model_dir, text_file, area, monkeypatch):
    monkeypatch.chdir(area)
    before = snapshot(area)
    res = _compress(cli, model_dir, text_file, "out", "--workdir", ".")
    assert_ok(res)
    assert_unchanged(before, snapshot(area), allow=["out"], what="the current folder used as --workdir")
    assert (area / "out" / "modelpress.json").is_file()


def test_workdir_that_does_not_exist_yet_is_left_empty(cli, model_dir, text_file, area):
    before = snapshot(area)
    res = _compress(cli, model_dir, text_file, area / "out", "--workdir", area / "scratch")
    assert_ok(res)
    assert_unchanged(before, snapshot(area), allow=["out", "scratch"])
    assert not (area / "scratch").exists() or not any((area / "scratch").iterdir()), \
        f"modelpress left files in the working folder: {sorted(snapshot(area / 'scratch'))}"


def test_default_working_folder_leaves_nothing(cli, model_dir, text_file, area):
    before = snapshot(area)
    res = _compress(cli, model_dir, text_file, area / "out")
    assert_ok(res)
    assert_unchanged(before, snapshot(area), allow=["out"])
    assert not (area / "out.work").exists()


def test_stale_temp_folders_of_dead_runs_are_removed(cli, model_dir, text_file, area):
    """A dead run's ``.out.tmp-<pid>-<time>`` goes; look-alikes that modelpress did not make stay."""
    out = area / "out"
    stale = area / f".out.tmp-{free_pid()}-1"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial weights of a killed run" * 100)
    notes = area / ".out.tmp-notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("the user's own hidden folder\n")
    (area / ".out.keep").write_text("a user file that only looks related\n")
    before = snapshot(area)
    res = _compress(cli, model_dir, text_file, out)
    assert_ok(res)
    assert not stale.exists(), f"the dead run's temporary folder {stale.name} is still there"
    expected = {k: v for k, v in before.items() if not k.startswith(stale.name)}
    assert_unchanged(expected, snapshot(area), allow=["out"])


def test_failed_overwrite_keeps_the_old_output(cli, model_dir, text_file, area):
    """A refused --overwrite run (bad recipe field) leaves the previous output as it was."""
    out = area / "out"
    assert_ok(cli("compress", "--model", model_dir, "--recipe", "rtn-w8", "--output", out))
    old = snapshot(out)
    names = {p.name for p in area.iterdir()}
    rec = area / "bad.yaml"
    rec.write_text("stages:\n  - method: rtn\n    targets: ['role:no_such_role']\n")
    res = cli("compress", "--model", model_dir, "--recipe", rec, "--output", out, "--overwrite")
    assert_user_error(res, after=lambda: assert_nothing_half_written(out, names, existed=old))
