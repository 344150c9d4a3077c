"""Helpers shared by the robustness suite: run the CLI in-process, check the failure contract,
snapshot folders, patch a function everywhere it is bound, build broken inputs.

The failure contract (see the package README and ``modelpress.cli.main``):

* user or environment error: exit 2, exactly one non-empty stderr line ``modelpress: error: ...``,
  nothing on stdout, never a traceback;
* unexpected internal failure: exit 1, one line ``modelpress: internal error: ... <log file>``;
* nothing half-written: no output unless it existed before, no hidden temp entries beside it.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import pytest

from tests.conftest import make_tiny_llama, make_tokenizer

#: Output files that hold timings: the only ones allowed to differ between two identical runs.
TIMED_FILES = ("report.json", "report.md")

#: Files of a "user area": things a user keeps that modelpress must never touch.
USER_FILES = {
    "thesis.tex": "\\documentclass{article}\n\\begin{document}My thesis.\\end{document}\n",
    "src/main.c": "int main(void) { return 0; }\n",
    "data/notes.txt": "notes the user wrote by hand\n",
    "data/raw/sample.bin": "\x01\x02\x03 raw bytes stand-in\n",
    ".config/settings.ini": "[user]\nname = me\n",
}


# ----------------------------------------------------------------------------------------------
# Running the CLI in-process
# ----------------------------------------------------------------------------------------------

@dataclass
class Result:
    """What one in-process CLI call did."""

    argv: list[str]
    rc: int | None  # None when main() raised instead of returning / exiting
    out: str
    err: str
    raised: BaseException | None
    tb: str
    seconds: float

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]

    def describe(self) -> str:
        raised = f"raised {type(self.raised).__name__}: {self.raised}\n{self.tb}" if self.raised else ""
        return (f"argv={self.argv}\nexit code={self.rc} {raised}\nstdout={self.out[-2000:]!r}\n"
                f"stderr={self.err[-3000:]!r}")


class _CurrentStream:
    """A stream that writes to whatever ``sys.<name>`` is *now*.

    A rich ``Console(file=sys.stderr)`` created at import time keeps the stream object it saw; under
    pytest that is one test's capture file, closed when that test ends, so a later test would fail
    on "I/O operation on closed file" and its output would never be captured. Consoles bound to
    this proxy behave as in a real process: they write to the current stderr.
    """

    def __init__(self, name: str) -> None:
        self._name = name

    def _target(self) -> Any:
        t = getattr(sys, self._name)
        return getattr(sys, f"__{self._name}__") if t is self else t

    def write(self, s: str) -> int:
        return self._target().write(s)

    def flush(self) -> None:
        self._target().flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, item: str) -> Any:
        return getattr(self._target(), item)


_PROXIES = {"stdout": _CurrentStream("stdout"), "stderr": _CurrentStream("stderr")}


def rebind_consoles() -> None:
    """Point every module-level rich Console of modelpress at the current-stream proxies."""
    from rich.console import Console

    for name, mod in list(sys.modules.items()):
        if mod is None or not name.startswith("modelpress"):
            continue
        for value in list(vars(mod).values()):
            if isinstance(value, Console) and getattr(value, "_file", None) is not None \
                    and value._file not in _PROXIES.values():
                is_out = value._file is sys.__stdout__ or getattr(value._file, "name", None) == "<stdout>"
                value._file = _PROXIES["stdout" if is_out else "stderr"]


def run_main(*argv: Any) -> int:
    """Call the CLI in-process without capturing (for fixtures); returns the exit code."""
    from modelpress.cli.main import main

    rebind_consoles()
    return main(["--quiet", *map(str, argv)])


def run_cli(capfd: pytest.CaptureFixture, *argv: Any, quiet: bool = True, debug: bool = False) -> Result:
    """Call ``modelpress.cli.main.main`` in-process and capture what it printed (fd level).

    An exception escaping ``main`` is recorded, not re-raised: for a user it is a traceback, which
    the contract forbids, and the assertion helpers say so with the traceback attached.
    """
    from modelpress.cli.main import main

    flags = (["--quiet"] if quiet else []) + (["--debug"] if debug else [])
    args = [*flags, *map(str, argv)]
    capfd.readouterr()  # drop what earlier steps printed
    raised, tb, rc = None, "", None
    t0 = time.perf_counter()
    try:
        rc = main(args)
    except SystemExit as e:  # argparse and sys.exit(): the process would exit with this code
        rc = 0 if e.code is None else (e.code if isinstance(e.code, int) else 1)
    except Exception as e:  # noqa: BLE001  (the point is to catch whatever escapes)
        raised, tb = e, traceback.format_exc()
    seconds = time.perf_counter() - t0
    out, err = capfd.readouterr()
    return Result(args, rc, out, err, raised, tb, seconds)


PROGRESS = re.compile(r"\d+%\|")  # a tqdm / rich progress bar line


def _failure_line(res: Result, code: int, prefix: str, needles: tuple[str | re.Pattern, ...],
                  after: Callable[[], None] | None) -> str:
    """The checks of a failure, most specific first: exit code, then ``after`` (what is on disk),
    then the one-line format, then progress-bar noise (a shared cause, reported last so that it
    does not hide a test's own reason)."""
    assert res.raised is None, f"main() let an exception escape (the user sees a traceback):\n{res.describe()}"
    assert res.rc == code, f"expected exit code {code}, got {res.rc}\n{res.describe()}"
    if after is not None:
        after()
    assert "Traceback" not in res.err, f"a traceback was printed:\n{res.describe()}"
    assert res.out.strip() == "", f"a failure must print nothing on stdout:\n{res.describe()}"
    lines = [x for x in res.err_lines if not PROGRESS.search(x)]
    assert len(lines) == 1, f"a failure must print exactly one line on stderr, got {len(lines)}:\n{res.describe()}"
    line = lines[0]
    assert line.startswith(prefix), f"the line must start with {prefix!r}: {line!r}"
    for n in needles:
        ok = n.search(line) if isinstance(n, re.Pattern) else n in line
        assert ok, f"the error line should mention {getattr(n, 'pattern', n)!r}: {line!r}"
    assert len(res.err_lines) == 1, ("the error line is right, but progress bars were printed on stderr too "
                                     f"(transformers' 'Loading weights'?), so it is not one line:\n{res.describe()}")
    return line


def assert_user_error(res: Result, *needles: str | re.Pattern, after: Callable[[], None] | None = None) -> str:
    """Exit 2, one stderr line ``modelpress: error: ...`` holding every needle (text or regex).

    ``after``: checks of what the failed call left on disk, run right after the exit code check.
    """
    return _failure_line(res, 2, "modelpress: error:", needles, after)


def assert_internal_error(res: Result, after: Callable[[], None] | None = None) -> str:
    """Exit 1, one line ``modelpress: internal error: ...``; returns the line."""
    return _failure_line(res, 1, "modelpress: internal error:", (), after)


def assert_ok_or_user_error(res: Result, after: Callable[[], None] | None = None) -> None:
    """Either success (exit 0) or a one-line user error (exit 2, then ``after``); never a traceback or exit 1."""
    assert res.raised is None, f"main() let an exception escape (the user sees a traceback):\n{res.describe()}"
    assert "Traceback" not in res.err, f"a traceback was printed:\n{res.describe()}"
    assert res.rc in (0, 2), f"expected exit 0 or a one-line exit 2, got {res.rc}\n{res.describe()}"
    if res.rc == 2:
        assert_user_error(res, after=after)


def assert_absent(path: Path, why: str) -> None:
    assert not path.exists(), f"{why}: {path}"


def assert_ok(res: Result) -> None:
    assert res.raised is None and res.rc == 0, f"expected success:\n{res.describe()}"


# ----------------------------------------------------------------------------------------------
# Folders: snapshots, leftovers, output digests
# ----------------------------------------------------------------------------------------------

def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_path(p: Path) -> str:
    return sha256_bytes(p.read_bytes())


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha256 (files), '<dir>' (folders), '<link>target' (symlinks); hidden ones too."""
    snap: dict[str, str] = {}
    if not root.exists():
        return snap
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        for d in dirnames:
            p = base / d
            rel = p.relative_to(root).as_posix()
            snap[rel + "/"] = "<link>" + os.readlink(p) if p.is_symlink() else "<dir>"
        for f in filenames:
            p = base / f
            rel = p.relative_to(root).as_posix()
            snap[rel] = "<link>" + os.readlink(p) if p.is_symlink() else sha256_path(p)
    return snap


def changes(before: dict[str, str], after: dict[str, str], allow: Iterable[str] = ()) -> list[str]:
    """What differs between two snapshots outside the allowed top-level entries (``out``, ``out/x``)."""
    allowed = tuple(allow)

    def ok(rel: str) -> bool:
        top = rel.rstrip("/").split("/")[0]
        return top in allowed

    diffs = []
    for rel in sorted(set(before) | set(after)):
        if ok(rel):
            continue
        a, b = before.get(rel), after.get(rel)
        if a != b:
            what = "removed" if b is None else "created" if a is None else "modified"
            diffs.append(f"{what}: {rel}")
    return diffs


def assert_unchanged(before: dict[str, str], after: dict[str, str], allow: Iterable[str] = (), what: str = "") -> None:
    diffs = changes(before, after, allow)
    assert not diffs, f"{what or 'the user area'} changed outside {list(allow)}:\n  " + "\n  ".join(diffs[:40])


def hidden_leftovers(parent: Path, before: Iterable[str] = ()) -> list[str]:
    """Hidden entries ('.name') in ``parent`` that were not there before."""
    old = set(before)
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".") and p.name not in old) \
        if parent.exists() else []


def assert_nothing_half_written(out: Path, parent_before: Iterable[str], existed: dict[str, str] | None = None) -> None:
    """After a failure: no output (or the old one unchanged) and no new hidden temp entries beside it.

    ``parent_before``: names in ``out.parent`` before the call. ``existed``: snapshot of ``out``
    when it existed before the call.
    """
    if existed is None:
        assert not out.exists(), f"a failed run left an output behind: {out} holds {sorted(snapshot(out))[:10]}"
    else:
        assert_unchanged(existed, snapshot(out), what=f"the pre-existing output {out}")
    left = hidden_leftovers(out.parent, parent_before)
    assert not left, f"a failed run left hidden temporary entries beside {out.name}: {left}"


def canonical_safetensors(data: bytes) -> bytes:
    """A safetensors file with its JSON header re-serialised with sorted keys.

    safetensors writes the ``__metadata__`` map in hash order (random per call), so two writes of the
    same tensors can differ in header bytes only; that is checked once, in test_nothing_silent.
    """
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    return json.dumps(header, sort_keys=True).encode() + data[8 + n:]


def output_digest(folder: Path) -> dict[str, str]:
    """sha256 of every output file except the timed reports, for comparing two runs.

    Two normalisations keep kill/resume tests to their own subject (byte-for-byte reproducibility
    itself is checked in test_nothing_silent): safetensors headers are compared with sorted keys
    (:func:`canonical_safetensors`), and ``modelpress.json`` without its ``files`` map (the sha256
    of the other files, report.json included, which holds timings; the files are compared directly).
    """
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if not p.is_file() or rel in TIMED_FILES:
            continue
        if rel == "modelpress.json":
            man = json.loads(p.read_text())
            man.pop("files", None)
            out[rel] = sha256_bytes(json.dumps(man, sort_keys=True).encode())
        elif rel.endswith(".safetensors"):
            out[rel] = sha256_bytes(canonical_safetensors(p.read_bytes()))
        else:
            out[rel] = sha256_path(p)
    return out


def digest_diff(a: dict[str, str], b: dict[str, str]) -> list[str]:
    return [f"{k}: {a.get(k, 'missing')[:12]} vs {b.get(k, 'missing')[:12]}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


def make_user_area(root: Path) -> Path:
    """A folder of user files (``USER_FILES``) that modelpress must leave alone."""
    for rel, text in USER_FILES.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


# ----------------------------------------------------------------------------------------------
# Patching
# ----------------------------------------------------------------------------------------------

def patch_everywhere(monkeypatch: pytest.MonkeyPatch, original: Callable, replacement: Callable,
                     prefixes: tuple[str, ...] | None = None) -> int:
    """Replace every module-level binding of ``original`` (``from x import f`` copies included).

    ``prefixes`` limits the modules searched (e.g. ``("modelpress",)``); returns how many bindings.
    """
    n = 0
    for name, mod in list(sys.modules.items()):
        if mod is None or (prefixes and not name.startswith(prefixes)):
            continue
        try:
            items = list(vars(mod).items())
        except TypeError:
            continue
        for attr, value in items:
            if value is original:
                monkeypatch.setattr(mod, attr, replacement)
                n += 1
    return n


def free_pid() -> int:
    """A PID that no process has now (for fake stale temp folders of a dead run)."""
    for pid in (999999, 999998, 888887, 777776, 4194301):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            continue
    pytest.skip("no free PID found for a fake dead run")


# ----------------------------------------------------------------------------------------------
# Broken inputs
# ----------------------------------------------------------------------------------------------

def random_bytes(n: int, *, nul: bool, seed: int = 1234) -> bytes:
    """Deterministic random bytes; without NUL when ``nul`` is False. Never valid UTF-8."""
    rng = random.Random(seed)
    lo = 0 if nul else 1
    data = bytes(rng.randint(lo, 255) for _ in range(n))
    if nul and b"\x00" not in data:
        data = b"\x00" + data[1:]
    data = b"\xff\xfe\xc3" + data  # invalid UTF-8 whatever the draw
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return data
    raise AssertionError("random bytes decoded as UTF-8")


LATIN1_TEXT = ("Le caf\u00e9 \u00e0 c\u00f4t\u00e9 de la gare: cr\u00e8me br\u00fbl\u00e9e, na\u00efvet\u00e9. " * 60)


def utf8_cut_mid_char(text: str) -> bytes:
    """UTF-8 bytes of ``text`` cut in the middle of a two-byte character (a truncated download)."""
    data = text.encode("utf-8")
    half = len(data) // 2
    i = data.index("\u00e9".encode(), half)
    return data[: i + 1]


def make_unreadable(monkeypatch: pytest.MonkeyPatch, target: Path) -> None:
    """Opening anything at or under ``target`` raises PermissionError (tests run as root, so
    chmod would not stop them): ``open``, ``io.open``, ``os.open`` and ``Path.open`` paths."""
    import builtins
    import io

    target_s = str(target.resolve())

    def hit(path: Any) -> bool:
        try:
            p = os.path.realpath(os.fspath(path))
        except TypeError:
            return False
        return p == target_s or p.startswith(target_s + os.sep)

    real_open, real_os_open = builtins.open, os.open

    def fake_open(file: Any, *a: Any, **kw: Any) -> Any:
        if not isinstance(file, int) and hit(file):
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return real_open(file, *a, **kw)

    def fake_os_open(path: Any, *a: Any, **kw: Any) -> int:
        if hit(path):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_os_open(path, *a, **kw)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)


def recipe_text_half(text: str) -> str:
    """The first half of a YAML text (a truncated file), cut mid-line."""
    return text[: len(text) // 2]


def line_number(n: int) -> re.Pattern:
    """A needle for :func:`assert_user_error`: 'line 3', 'row 3' or 'file.jsonl:3'."""
    return re.compile(rf"(?:line\s*{n}\b|:{n}\b|\brow\s*{n}\b)")


# ----------------------------------------------------------------------------------------------
# Models and commands
# ----------------------------------------------------------------------------------------------

def build_model_dir(d: Path, *, seed: int = 0, layers: int = 2) -> Path:
    """A tiny Llama (hidden 64) with its tokenizer saved to ``d``."""
    d.mkdir(parents=True, exist_ok=True)
    make_tiny_llama(seed=seed, layers=layers).save_pretrained(str(d))
    make_tokenizer(d)
    return d


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@functools.lru_cache(maxsize=None)
def gptq_recipe_name() -> str:
    """A built-in GPTQ recipe whose group size tiles the tiny model's widths (64, 128)."""
    from modelpress.pipeline.recipe import builtin_recipes

    names = builtin_recipes()
    for n in ("gptq-w4-g32", "gptq-w4-g64", "gptq-w4"):
        if n in names:
            return n
    pytest.skip(f"no built-in GPTQ recipe among {sorted(names)}")


def calib_args(text: Path, samples: int = 4, seq_len: int = 32) -> list[str]:
    return ["--calib", str(text), "--calib-samples", str(samples), "--calib-seq-len", str(seq_len)]


# ----------------------------------------------------------------------------------------------
# Subprocesses (kill and timing tests)
# ----------------------------------------------------------------------------------------------

DRIVER = Path(__file__).with_name("_driver.py")


def driver_env(**overrides: str | None) -> dict[str, str]:
    """The environment of a driver process: this process's, with the same modelpress importable."""
    import modelpress

    env = dict(os.environ)
    root = str(Path(modelpress.__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["MODELPRESS_PROGRESS"] = "0"
    for k, v in overrides.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def driver_cmd(argv: Iterable[Any], *, fault: str | None = None, marks: Path | None = None) -> list[str]:
    cmd = [sys.executable, str(DRIVER)]
    if fault:
        cmd += ["--fault", fault]
    if marks:
        cmd += ["--marks", str(marks)]
    return cmd + ["--", "--quiet", *map(str, argv)]


@dataclass
class Job:
    """One CLI run of a driver batch: ``argv`` (``--quiet`` added) in ``cwd`` with an optional fault."""

    argv: list[Any]
    cwd: Path
    fault: str | None = None
    rc: int | None = None  # filled by run_batch: exit status, -9 when SIGKILLed
    stdout: str = ""
    stderr: str = ""


def run_batch(jobs: list[Job], workdir: Path, timeout: float = 300, env: dict[str, str] | None = None) -> None:
    """Run every job in its own forked child of ONE driver process (one interpreter start)."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec = [{"argv": ["--quiet", *map(str, j.argv)], "cwd": str(j.cwd), "fault": j.fault,
             "stdout": str(workdir / f"job{i}.out"), "stderr": str(workdir / f"job{i}.err")}
            for i, j in enumerate(jobs)]
    (workdir / "jobs.json").write_text(json.dumps(spec))
    p = subprocess.run([sys.executable, str(DRIVER), "--batch", str(workdir / "jobs.json"),
                        str(workdir / "results.json")], env=env or driver_env(), capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, f"the driver batch failed:\n{p.stderr[-3000:]}"
    for i, (job, rc) in enumerate(zip(jobs, json.loads((workdir / "results.json").read_text()))):
        job.rc = rc
        job.stdout = (workdir / f"job{i}.out").read_text()
        job.stderr = (workdir / f"job{i}.err").read_text()


def process_result(job: Job) -> Result:
    """A batch job (a real process) as a :class:`Result`, for the same assertion helpers."""
    return Result(list(map(str, job.argv)), job.rc, job.stdout, job.stderr, None, "", 0.0)
