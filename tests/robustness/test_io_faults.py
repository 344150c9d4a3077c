"""G. Disk full / permission denied at every write point of compress, export --format hf and
eval --json: one line naming a path and the cause, nothing half-written, the user area unchanged,
and the same command succeeds once the fault is gone.

Faults are injected in-process at the n-th write under the test's user area (first / last call;
the number of calls of each write point is counted once per command, so a write point the command
does not use today is skipped with that reason, and joins by itself when the code starts using it).
A last test fills a real tiny tmpfs when this machine lets us mount one.
"""
from __future__ import annotations

import builtins
import errno
import io
import os
import pathlib
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

from .support import (assert_absent, assert_ok, assert_unchanged, assert_user_error, calib_args, gptq_recipe_name,
                      hidden_leftovers, make_user_area, patch_everywhere, run_main, snapshot)

ERRORS = {
    "ENOSPC": lambda p: OSError(errno.ENOSPC, "No space left on device", p),
    "EACCES": lambda p: PermissionError(errno.EACCES, "Permission denied", p),
    "EROFS": lambda p: OSError(errno.EROFS, "Read-only file system", p),
}
CAUSE = {"ENOSPC": "No space left on device", "EACCES": "Permission denied", "EROFS": "Read-only file system"}


@dataclass
class Injector:
    """Counts the in-scope calls of one write point and raises at call ``fail_at``."""

    scope: str
    fail_at: int | None = None
    error: str = "ENOSPC"
    calls: int = 0
    fired: str | None = None
    paths: list[str] = field(default_factory=list)

    def in_scope(self, path: Any) -> bool:
        try:
            p = os.path.realpath(os.fspath(path))
        except TypeError:
            return False
        return p == self.scope or p.startswith(self.scope + os.sep)

    def hit(self, path: Any) -> None:
        if not self.in_scope(path):
            return
        self.calls += 1
        self.paths.append(os.fspath(path))
        if self.calls == self.fail_at:
            self.fired = os.fspath(path)
            raise ERRORS[self.error](self.fired)


def _is_write_mode(mode: str) -> bool:
    return any(c in mode for c in "wax+")


def _install_save_file(mp: pytest.MonkeyPatch, inj: Injector) -> None:
    import safetensors.torch as st

    real = st.save_file

    def save_file(tensors, filename, *a, **kw):
        inj.hit(filename)
        return real(tensors, filename, *a, **kw)

    patch_everywhere(mp, real, save_file)


def _install_write_text(mp: pytest.MonkeyPatch, inj: Injector) -> None:
    real = pathlib.Path.write_text

    def write_text(self, *a, **kw):
        inj.hit(self)
        return real(self, *a, **kw)

    mp.setattr(pathlib.Path, "write_text", write_text)


def _install_open_write(mp: pytest.MonkeyPatch, inj: Injector) -> None:
    real_open, real_os_open = builtins.open, os.open
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def fake_open(file, mode="r", *a, **kw):
        if not isinstance(file, int) and _is_write_mode(mode):
            inj.hit(file)
        return real_open(file, mode, *a, **kw)

    def fake_os_open(path, flags, *a, **kw):
        if flags & write_flags:
            inj.hit(path)
        return real_os_open(path, flags, *a, **kw)

    mp.setattr(builtins, "open", fake_open)
    mp.setattr(io, "open", fake_open)
    patch_everywhere(mp, real_os_open, fake_os_open)


def _install_replace(mp: pytest.MonkeyPatch, inj: Injector) -> None:
    for real in (os.replace, os.rename):
        def fake(src, dst, *a, _real=real, **kw):
            if inj.in_scope(src) or inj.in_scope(dst):
                inj.hit(src if inj.in_scope(src) else dst)
            return _real(src, dst, *a, **kw)
        patch_everywhere(mp, real, fake)


def _install_mkdir(mp: pytest.MonkeyPatch, inj: Injector) -> None:
    real = os.mkdir

    def mkdir(path, *a, **kw):
        if not os.path.lexists(path):  # making an existing folder fails with EEXIST, never ENOSPC
            inj.hit(path)
        return real(path, *a, **kw)

    patch_everywhere(mp, real, mkdir)


def _install_copyfile(mp: pytest.MonkeyPatch, inj: Injector) -> None:
    real = shutil.copyfile

    def copyfile(src, dst, *a, **kw):
        inj.hit(dst)
        return real(src, dst, *a, **kw)

    patch_everywhere(mp, real, copyfile)


POINTS: dict[str, Callable[[pytest.MonkeyPatch, Injector], None]] = {
    "safetensors.save_file": _install_save_file,
    "Path.write_text": _install_write_text,
    "open-for-write": _install_open_write,
    "os.replace": _install_replace,
    "mkdir": _install_mkdir,
    "shutil.copyfile": _install_copyfile,
}


# -- the commands ---------------------------------------------------------------------------------------

@dataclass
class Scenario:
    argv: list[Any]
    target: Path  # the output this command writes
    allow: tuple[str, ...]  # top-level names in the area a failed run may leave (a resumable work folder)


def _scenario(name: str, area: Path, model_dir: Path, text_file: Path, compressed_dir: Path) -> Scenario:
    if name == "compress":
        out = area / "out"
        return Scenario(["compress", "--model", model_dir, "--recipe", gptq_recipe_name(), *calib_args(text_file),
                         "--output", out], out, ("out", "out.work"))
    if name == "export-hf":
        out = area / "hf"
        return Scenario(["export", "--model", compressed_dir, "--format", "hf", "--output", out], out, ("hf",))
    if name == "eval-json":
        out = area / "res.json"
        return Scenario(["eval", "--model", model_dir, "--data", text_file, "--seq-len", "32", "--max-tokens", "128",
                         "--json", out], out, ("res.json",))
    raise AssertionError(name)


SCENARIOS = ["compress", "export-hf", "eval-json"]


@pytest.fixture(scope="module")
def call_counts(model_dir, text_file, compressed_dir, tmp_path_factory) -> dict[tuple[str, str], int]:
    """(scenario, write point) -> in-area calls during one clean run."""
    counts = {}
    for name in SCENARIOS:
        area = make_user_area(tmp_path_factory.mktemp(f"count_{name}") / "area")
        sc = _scenario(name, area, model_dir, text_file, compressed_dir)
        scope = os.path.realpath(area)
        injectors = {p: Injector(scope) for p in POINTS}
        mp = pytest.MonkeyPatch()
        try:
            for p, install in POINTS.items():
                install(mp, injectors[p])
            rc = run_main(*sc.argv)
        finally:
            mp.undo()
        assert rc == 0, f"the clean {name} run failed (rc {rc})"
        counts.update({(name, p): inj.calls for p, inj in injectors.items()})
    return counts


def _rows() -> list[Any]:
    rows = []
    for sc in SCENARIOS:
        for point in POINTS:
            for error, nth in (("ENOSPC", "first"), ("ENOSPC", "last"), ("EACCES", "first"), ("EROFS", "first")):
                rows.append(pytest.param(sc, point, error, nth, id=f"{sc}-{point}-{error}-{nth}"))
    return rows


@pytest.mark.parametrize("scenario, point, error, nth", _rows())
def test_write_fault(scenario, point, error, nth, call_counts, cli, model_dir, text_file, compressed_dir, area,
                     monkeypatch):
    count = call_counts[(scenario, point)]
    if count == 0:
        pytest.skip(f"{scenario} does not use {point} (under the output's folder) today")
    n = 1 if nth == "first" else count
    if nth == "last" and count == 1:
        pytest.skip("one call only: the same as 'first'")
    sc = _scenario(scenario, area, model_dir, text_file, compressed_dir)
    before, names = snapshot(area), {p.name for p in area.iterdir()}
    inj = Injector(os.path.realpath(area), fail_at=n, error=error)
    with monkeypatch.context() as mp:
        POINTS[point](mp, inj)
        res = cli(*sc.argv)
    assert inj.fired, f"the fault did not fire: {point} was called {inj.calls} times (expected {count})"

    def nothing_left() -> None:
        assert not sc.target.exists(), f"a failed run left {sc.target.name} behind (fault at {inj.fired})"
        left = hidden_leftovers(area, names)
        assert not left, f"hidden temporary entries left after the fault at {inj.fired}: {left}"
        assert_unchanged(before, snapshot(area), allow=sc.allow)

    line = assert_user_error(res, CAUSE[error], after=nothing_left)
    assert str(area) + os.sep in line, f"the line should name the path that failed (under {area}): {line!r}"
    assert_ok(cli(*sc.argv))  # the fault is gone: the same command succeeds
    assert sc.target.exists()
    assert not hidden_leftovers(area, names)
    assert_unchanged(before, snapshot(area), allow=(sc.target.name,))


# -- a real full disk, a real read-only file system ----------------------------------------------------------

def _mount_tmpfs(mnt: Path, options: str) -> None:
    mnt.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): {p.stderr.strip()}")


@pytest.fixture
def mounts(tmp_path: Path):
    """``mount(name, options)`` mounts a tmpfs under tmp_path; all are unmounted after the test."""
    done: list[Path] = []

    def mount(name: str, options: str) -> Path:
        mnt = tmp_path / name
        _mount_tmpfs(mnt, options)
        done.append(mnt)
        return mnt

    yield mount
    for mnt in reversed(done):
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_real_disk_full(mounts, cli, model_dir, text_file):
    """A 64 KiB tmpfs: the output (and its working folder) cannot fit."""
    area = make_user_area(mounts("full", "size=64k") / "area")
    out = area / "out"
    before, names = snapshot(area), {p.name for p in area.iterdir()}
    res = cli("compress", "--model", model_dir, "--recipe", gptq_recipe_name(), *calib_args(text_file),
              "--output", out)

    def nothing_left() -> None:
        assert not out.exists(), "a failed run left its output on the full disk"
        assert not hidden_leftovers(area, names), f"hidden leftovers: {hidden_leftovers(area, names)}"
        assert_unchanged(before, snapshot(area), allow=("out", "out.work"))

    line = assert_user_error(res, "No space left on device", after=nothing_left)
    assert str(area) in line, f"the line should name the path on the full disk: {line!r}"


@pytest.mark.parametrize("where", ["output", "workdir", "eval-json"])
def test_real_read_only_file_system(where, mounts, cli, model_dir, text_file, tmp_path):
    """A read-only tmpfs as the output's folder, the --workdir, or eval's --json folder."""
    ro = mounts("ro", "ro,size=64k")
    out = (ro if where == "output" else tmp_path) / "out"
    if where == "eval-json":
        argv = ["eval", "--model", model_dir, "--data", text_file, "--seq-len", "32", "--max-tokens", "128",
                "--json", ro / "res.json"]
    else:
        argv = ["compress", "--model", model_dir, "--recipe", gptq_recipe_name(), *calib_args(text_file),
                "--output", out] + (["--workdir", ro / "work"] if where == "workdir" else [])
    res = cli(*argv)
    line = assert_user_error(res, "Read-only file system", after=lambda: assert_absent(out, "output left behind"))
    assert str(ro) in line, f"the line should name the read-only path: {line!r}"
