"""Task files: multiple-choice and generation items read strictly from JSONL.

One JSON object a line. A file is a multiple-choice task when its first row has ``choices``:

    {"context": "The cat sat on the", "choices": ["mat", "moon"], "label": 0, "slice": "easy"}

and a generation task when it has ``answer`` (a string) or ``answers`` (a list of strings):

    {"prompt": "Q: What is 2 + 2?\\nA:", "answers": ["4", "four"], "until": ["\\n"]}

``slice`` (optional) names the group an item belongs to (see :mod:`modelpress.eval.slices`). Every
problem (a label outside the choices, no choices, an empty file, a line that is not JSON) is a
one-line :class:`ModelpressError` naming the file and the line, because a task scored on a
silently skipped row reports a number nobody asked for.

Example:
    >>> task = read_task("hellaswag.jsonl")        # doctest: +SKIP
    >>> task.name, task.kind, len(task.items)      # doctest: +SKIP
    ('hellaswag', <TaskKind.CHOICE: 'choice'>, 400)
"""
from __future__ import annotations

import enum
import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import ModelpressError


class TaskKind(str, enum.Enum):
    """How a task is scored: log-likelihood of each choice, or greedy generation vs references."""

    CHOICE = "choice"
    GENERATION = "generation"


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice question; ``line`` is its line in the task file."""

    context: str
    choices: tuple[str, ...]
    label: int
    slice: str | None = None
    line: int = 0


@dataclass(frozen=True)
class GenerationItem:
    """One prompt with its reference answers; generation stops at any of ``until``."""

    prompt: str
    answers: tuple[str, ...]
    until: tuple[str, ...] = ("\n",)
    max_new_tokens: int = 32
    slice: str | None = None
    line: int = 0


@dataclass(frozen=True)
class Task:
    """A task file's items; ``name`` is the file's stem (the key in reports)."""

    name: str
    path: Path
    kind: TaskKind
    items: tuple[ChoiceItem, ...] | tuple[GenerationItem, ...]


def task_name(path: str | Path) -> str:
    """The file's stem without ``.jsonl`` / ``.gz`` (``tasks/blimp_anaphor.jsonl.gz`` -> ``blimp_anaphor``)."""
    name = Path(path).name
    for suffix in (".gz", ".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return name


def read_lines(path: str | Path) -> list[str]:
    """Lines of a UTF-8 (optionally gzipped) file; missing, folder, empty, binary: one-line errors."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise ModelpressError(f"task file {p} is a folder, not a file")
    if not p.is_file():
        raise ModelpressError(f"task file not found: {p}")
    raw = p.read_bytes()
    if p.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise ModelpressError(f"{p}: not a readable gzip file ({e})") from None
    if b"\0" in raw:
        raise ModelpressError(f"{p} is binary (it holds NUL bytes), not UTF-8 JSONL")
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise ModelpressError(f"{p} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    return text.splitlines()


def read_task(path: str | Path, limit: int | None = None) -> Task:
    """Read and check a task file (first ``limit`` items when given)."""
    p = Path(path).expanduser()
    rows = _json_rows(p, read_lines(p))
    if not rows:
        raise ModelpressError(f"{p} holds no task items (empty file)")
    first_line, first = rows[0]
    kind = _kind_of(p, first_line, first)
    parse = _choice_item if kind is TaskKind.CHOICE else _generation_item
    items = tuple(parse(p, i, r) for i, r in rows[:limit])
    return Task(task_name(p), p, kind, items)


def _json_rows(p: Path, lines: list[str]) -> list[tuple[int, dict[str, Any]]]:
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ModelpressError(f"{p}:{i}: invalid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise ModelpressError(f"{p}:{i}: expected a JSON object, got {_type(rec)}")
        out.append((i, rec))
    return out


def _kind_of(p: Path, line: int, rec: dict[str, Any]) -> TaskKind:
    if "choices" in rec:
        return TaskKind.CHOICE
    if "answer" in rec or "answers" in rec:
        return TaskKind.GENERATION
    raise ModelpressError(f"{p}:{line}: a task row needs 'choices' (multiple choice) or 'answer'/'answers' "
                          f"(generation); keys: {', '.join(map(str, rec))[:80] or 'none'}")


def _type(v: Any) -> str:
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number", list: "a list",
            dict: "an object", str: "a string"}.get(type(v), type(v).__name__)


def _string(p: Path, line: int, rec: dict[str, Any], key: str, default: str | None = None) -> str:
    v = rec.get(key, default)
    if not isinstance(v, str):
        what = "missing" if key not in rec else f"{_type(v)}, not a string"
        raise ModelpressError(f"{p}:{line}: {key!r} is {what}")
    return v


def _slice(p: Path, line: int, rec: dict[str, Any]) -> str | None:
    v = rec.get("slice")
    if v is not None and (isinstance(v, bool) or not isinstance(v, (str, int))):
        raise ModelpressError(f"{p}:{line}: 'slice' must be a string, got {_type(v)}")
    return None if v is None else str(v)


def _choice_item(p: Path, line: int, rec: dict[str, Any]) -> ChoiceItem:
    choices = rec.get("choices")
    if not isinstance(choices, list):
        raise ModelpressError(f"{p}:{line}: 'choices' must be a list of strings, got {_type(choices)}")
    if not choices:
        raise ModelpressError(f"{p}:{line}: 'choices' is empty")
    for j, c in enumerate(choices):
        if not isinstance(c, str) or not c:
            raise ModelpressError(f"{p}:{line}: choice {j} must be a non-empty string, got {_type(c) if c else 'an empty one'}")
    label = rec.get("label")
    if not isinstance(label, int) or isinstance(label, bool):
        raise ModelpressError(f"{p}:{line}: 'label' must be an integer index into 'choices', got {_type(label)}")
    if not 0 <= label < len(choices):
        raise ModelpressError(f"{p}:{line}: label {label} is outside the {len(choices)} choices (0..{len(choices) - 1})")
    return ChoiceItem(_string(p, line, rec, "context", ""), tuple(choices), label, _slice(p, line, rec), line)


def _generation_item(p: Path, line: int, rec: dict[str, Any]) -> GenerationItem:
    answers = rec.get("answers", [rec["answer"]] if "answer" in rec else None)
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ModelpressError(f"{p}:{line}: 'answer' must be a string or 'answers' a non-empty list of strings")
    until = rec.get("until", ["\n"])
    if not isinstance(until, list) or not all(isinstance(u, str) and u for u in until):
        raise ModelpressError(f"{p}:{line}: 'until' must be a list of non-empty strings")
    n = rec.get("max_new_tokens", 32)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 4096:
        raise ModelpressError(f"{p}:{line}: 'max_new_tokens' must be an integer in 1..4096, got {n!r}")
    prompt = _string(p, line, rec, "prompt", rec.get("context"))
    return GenerationItem(prompt, tuple(answers), tuple(until), n, _slice(p, line, rec), line)
