"""Ownership of output files: modelpress replaces or deletes only what it wrote.

An output is built in a hidden temporary entry beside it (``.NAME.tmp-PID-TIME``) and renamed into
place when complete. An existing output is replaced only when it is one of ours: a folder whose
marker file (``modelpress.json`` for compressed models, ``export_report.json`` for exports) lists
every file in it, or a file with our ``.export.json`` beside it (a ``.gguf``, generated text).
Temporary entries left by a killed run (their PID no longer runs) are removed by the next run to
the same output.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Iterator

from .errors import EnvironmentFailure, ModelpressError, io_cause

MANIFEST = "modelpress.json"
EXPORT_REPORT = "export_report.json"
#: Files a compressed output holds beside those its manifest hashes (they contain timings).
REPORT_FILES = ("report.json", "report.md")
#: First file of every temporary folder: proof that a stale ``.NAME.tmp-*`` folder is ours.
TEMP_MARKER = ".modelpress-temp"
#: Names of files modelpress writes into an output: a stale temporary folder holding only these (a
#: kill can land between creating the folder and writing its marker) is ours too.
_OUTPUT_FILE_RE = re.compile(r"^(model.*\.safetensors(\.index\.json)?|config\.json|generation_config\.json|"
                             r"tokenizer.*|special_tokens_map\.json|modelpress\.json|report\.(json|md)|"
                             r"export_report\.json|recipe\.yaml|.*\.export\.json)$")
#: ``format`` of a sidecar that marks the file beside it as ours (single-file outputs).
SIDECAR_FORMATS = ("gguf", "generated-text")
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)(?:-\d+)?$")


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def owned_files(folder: Path) -> set[str] | None:
    """Names of the files modelpress wrote into ``folder``, or None when it is not our output."""
    man = _read_json(folder / MANIFEST)
    if man is not None and isinstance(man.get("files"), dict):
        return set(man["files"]) | {MANIFEST} | set(REPORT_FILES)
    rep = _read_json(folder / EXPORT_REPORT)
    if rep is not None and isinstance(rep.get("files"), list):
        return set(rep["files"]) | {EXPORT_REPORT}
    return None


def export_sidecar(path: Path) -> Path:
    """The per-tensor report written beside a single-file export (``x.gguf`` -> ``x.export.json``)."""
    return path.with_suffix(".export.json")


def _not_ours(out: Path) -> str | None:
    """Why ``out`` may not be replaced, or None when it is our output and holds nothing else."""
    if out.is_file():
        side = _read_json(export_sidecar(out))
        ours = side is not None and side.get("format") in SIDECAR_FORMATS
        return None if ours else "it is a file modelpress did not write"
    if not out.is_dir():
        return "it is not a regular file or folder"
    owned = owned_files(out)
    if owned is None:
        return f"it is not a modelpress output (no {MANIFEST} or {EXPORT_REPORT} listing its files)"
    foreign = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                     if p.is_file() and p.relative_to(out).as_posix() not in owned)
    foreign += sorted(p.relative_to(out).as_posix() + "/" for p in out.rglob("*") if p.is_dir() and not any(p.iterdir()))
    if foreign:
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        return f"it holds files modelpress did not write ({', '.join(foreign[:5])}{more})"
    return None


def check_replaceable(out: str | os.PathLike, overwrite: bool) -> None:
    """Refuse an existing ``out`` unless ``overwrite`` and it is entirely ours (see module docstring)."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise ModelpressError(f"output {out} exists; pass --overwrite to replace it")
    why = _not_ours(out)
    if why is not None:
        raise ModelpressError(f"refusing to replace {out}: {why}; choose another output path or remove it yourself")


def pid_alive(pid: int) -> bool:
    """True when a process with this PID runs (a reused PID counts as running: we keep its files)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_temps(out: Path) -> list[Path]:
    """Temporary entries of a killed run to ``out`` (pattern, dead PID, and our marker or output)."""
    found = []
    try:
        siblings = list(out.parent.iterdir()) if out.parent.is_dir() else []
    except OSError:
        return []
    for p in siblings:
        m = _TEMP_RE.match(p.name)
        if m is None or m.group("name") != out.name or int(m.group("pid")) == os.getpid() or pid_alive(int(m.group("pid"))):
            continue
        if p.is_file() or (p.is_dir() and _looks_like_our_temp(p)):
            found.append(p)
    return found


def _looks_like_our_temp(folder: Path) -> bool:
    """Our marker, our manifest, or nothing but files named as modelpress names its outputs."""
    if (folder / TEMP_MARKER).exists() or owned_files(folder) is not None:
        return True
    return all(p.is_file() and _OUTPUT_FILE_RE.match(p.name) for p in folder.iterdir())


def remove(path: Path) -> None:
    """Delete a file or folder tree that modelpress owns."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def clean_stale_temps(out: str | os.PathLike) -> list[Path]:
    """Remove what a killed run to ``out`` left beside it; returns what was removed."""
    removed = stale_temps(Path(out))
    for p in removed:
        try:
            remove(p)
        except OSError as e:
            raise EnvironmentFailure.from_os_error(e, "remove", p) from None
    return removed


def temp_path(out: Path, *, is_file: bool = False) -> Path:
    """A fresh temporary entry beside ``out`` (a marked folder, or a file path when ``is_file``)."""
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{time.time_ns()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if not is_file:
            tmp.mkdir()
            (tmp / TEMP_MARKER).touch()
    except OSError as e:
        with contextlib.suppress(OSError):
            remove(tmp)
        raise EnvironmentFailure.from_os_error(e, "create", out.parent) from None
    return tmp


def swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the complete ``tmp`` to ``out``; an old ``out`` is moved aside first and removed after."""
    marker = tmp / TEMP_MARKER
    if marker.exists():
        marker.unlink()
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:
            os.replace(old, out)  # put the user's previous output back
        raise
    if old is not None:
        remove(old)


@contextlib.contextmanager
def atomic_output(output: str | os.PathLike, overwrite: bool, *, is_file: bool = False) -> Iterator[Path]:
    """Yield a temporary path (folder, or file when ``is_file``) that becomes ``output`` on success.

    Refuses to replace what is not ours, clears a killed run's leftovers first, and turns an I/O
    failure into one line naming the path and the cause; on any failure nothing is left behind.

    Example:
        >>> with atomic_output("out/model", overwrite=True) as tmp:  # doctest: +SKIP
        ...     (tmp / "model.safetensors").write_bytes(data)
    """
    out = Path(output)
    check_replaceable(out, overwrite)
    clean_stale_temps(out)
    tmp = temp_path(out, is_file=is_file)
    try:
        with writing(out):
            yield tmp
            swap_into_place(tmp, out)
    finally:
        if tmp.exists() or tmp.is_symlink():
            with contextlib.suppress(OSError):
                remove(tmp)


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` whose I/O failures name the path (its Rust writer's errors
    carry the OS cause only as text)."""
    from safetensors.torch import save_file

    with writing(path):
        save_file(tensors, str(path), metadata=metadata)


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn an I/O failure inside the block into one line naming ``path`` (or the file the OS named)
    and the cause, including the OS errors that libraries report only as text."""
    try:
        yield
    except OSError as e:
        raise EnvironmentFailure.from_os_error(e, "write", path) from None
    except Exception as e:
        cause = io_cause(e)
        if cause is None:
            raise
        raise EnvironmentFailure(f"cannot write {path}: {cause}") from None
