"""Text sources for calibration and evaluation: files, Hugging Face datasets, and texts shipped with
modelpress, read strictly.

A source is a path (plain UTF-8 text, ``.jsonl`` with a ``text`` field, either optionally
``.gz``), ``hf:DATASET[:CONFIG][:SPLIT]`` (needs ``datasets`` and a hub) or ``bundled:NAME``.
Binary data, another encoding, an empty file or a JSONL row without a string ``text`` is a
one-line error naming the file (and line): a model calibrated on garbage still "works", which
is exactly the silent failure to avoid.

Example:
    >>> docs = read_documents("bundled:c4", max_docs=4)        # doctest: +SKIP
    >>> text = read_text("bundled:wikitext2")                  # doctest: +SKIP
"""
from __future__ import annotations

import gzip
import hashlib
import json
import unicodedata
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..core.errors import ModelpressError

#: Share of control characters (other than tab, newline, CR, FF, VT) above which a file is binary.
MAX_CONTROL_SHARE = 0.01


@dataclass(frozen=True)
class BundledText:
    """A text shipped inside the package (see ``modelpress/data/bundled/README.md`` for licences)."""

    file: str
    description: str
    licence: str
    join_lines: bool  # rows of a line-per-row corpus are joined with blank lines (GPTQ protocol)


BUNDLED_TEXTS = {
    "c4": BundledText("c4_en_train_first600.jsonl.gz",
                      "first 600 documents of allenai/c4 en train (the GPTQ calibration shard's start)",
                      "ODC-BY 1.0 (C4, Allen Institute for AI)", False),
    "wikitext2": BundledText("wikitext2_test_raw.txt.gz",
                             "WikiText-2 raw test split, one row per line, empty rows dropped",
                             "CC BY-SA 3.0 (WikiText, Merity et al. 2016)", True),
}
DEFAULT_CALIBRATION = "bundled:c4"
DEFAULT_EVALUATION = "bundled:wikitext2"


def bundled_path(spec: str) -> Path:
    """File of ``bundled:NAME``; unknown names list the known ones."""
    name = spec.split(":", 1)[1]
    if name not in BUNDLED_TEXTS:
        raise ModelpressError(f"unknown bundled text {name!r}; shipped: {', '.join(f'bundled:{n}' for n in BUNDLED_TEXTS)}")
    return Path(str(resources.files("modelpress.data") / "bundled" / BUNDLED_TEXTS[name].file))


def default_join_lines(spec: str | Path) -> bool:
    """Whether a source's rows are joined with blank lines unless the caller says otherwise."""
    s = str(spec)
    return s.startswith("bundled:") and BUNDLED_TEXTS.get(s.split(":", 1)[1], BUNDLED_TEXTS["c4"]).join_lines


def _file(spec: str | Path, what: str) -> Path:
    s = str(spec)
    p = bundled_path(s) if s.startswith("bundled:") else Path(s).expanduser()
    if p.is_dir():
        raise ModelpressError(f"{what} {p} is a folder, not a file")
    if not p.is_file():
        raise ModelpressError(f"{what} not found: {p}")
    return p


def check_source(spec: str | Path, what: str = "file") -> None:
    """Fail fast (before a slow model load) when a file source does not exist or is a folder."""
    s = str(spec)
    if not s.startswith("hf:") and not s.endswith(".safetensors"):
        _file(s, what)
    elif s.endswith(".safetensors") and not Path(s).is_file():
        raise ModelpressError(f"{what} not found: {s}")


def _decode(raw: bytes, p: Path) -> str:
    """Strict UTF-8 that is text, not binary: one-line errors otherwise."""
    if not raw.strip():
        raise ModelpressError(f"{p} is empty")
    if b"\0" in raw:
        raise ModelpressError(f"{p} is binary (it holds NUL bytes), not UTF-8 text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ModelpressError(f"{p} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                              "convert it, e.g. iconv -f latin1 -t utf-8") from None
    control = sum(1 for ch in text if unicodedata.category(ch) == "Cc" and ch not in "\t\n\r\f\v")
    if control > MAX_CONTROL_SHARE * len(text):
        raise ModelpressError(f"{p} looks binary ({control} control characters in {len(text)}), not text")
    return text.removeprefix("\ufeff")


def _read(p: Path) -> str:
    raw = p.read_bytes()
    if p.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise ModelpressError(f"{p}: not a readable gzip file ({e})") from None
    return _decode(raw, p)


def _is_jsonl(p: Path) -> bool:
    return p.name.removesuffix(".gz").endswith((".jsonl", ".json"))


def read_text(spec: str | Path, join_lines: bool | None = None) -> str:
    """One evaluation text; ``join_lines`` joins non-empty lines with blank lines (WikiText-2 rows).

    ``None`` uses the source's own default (on for ``bundled:wikitext2``).
    """
    join = default_join_lines(spec) if join_lines is None else join_lines
    if str(spec).startswith("hf:"):
        rows = _hf_texts(str(spec)[3:], "text", None, default_split="test")
        return "\n\n".join(r for r in rows if r.strip()) if join else "\n\n".join(rows)
    p = _file(spec, "data file")
    docs = _jsonl(p, "text", None) if _is_jsonl(p) else None
    text = "\n\n".join(docs) if docs is not None else _read(p)
    if join:
        text = "\n\n".join(line for line in text.splitlines() if line.strip())
    if not text.strip():
        raise ModelpressError(f"{p} holds no text")
    return text


def read_documents(spec: str | Path, text_field: str = "text", max_docs: int | None = None) -> list[str]:
    """Documents: a plain text file is one, JSONL one per line, ``hf:`` one per dataset row."""
    if str(spec).startswith("hf:"):
        return _hf_texts(str(spec)[3:], text_field, max_docs, default_split="train")
    p = _file(spec, "calibration file")
    docs = _jsonl(p, text_field, max_docs) if _is_jsonl(p) else [_read(p)]
    if not any(d.strip() for d in docs):
        raise ModelpressError(f"{p} holds no text")
    return docs


def _jsonl(p: Path, field: str, max_docs: int | None) -> list[str]:
    """``field`` of each JSON object line; a row of another shape is an error naming its line."""
    out = []
    for i, line in enumerate(_read(p).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ModelpressError(f"{p}:{i}: invalid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise ModelpressError(f"{p}:{i}: expected a JSON object with a {field!r} field, got {type(rec).__name__}")
        if field not in rec:
            raise ModelpressError(f"{p}:{i}: no {field!r} field (keys: {', '.join(map(str, rec))[:80]})")
        if not isinstance(rec[field], str):
            raise ModelpressError(f"{p}:{i}: {field!r} must be a string, got {_json_type(rec[field])}")
        out.append(rec[field])
        if max_docs and len(out) >= max_docs:
            break
    return out


def _json_type(v: Any) -> str:
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number", list: "a list",
            dict: "an object"}.get(type(v), type(v).__name__)


def _hf_texts(spec: str, field: str, max_docs: int | None, default_split: str) -> list[str]:
    """Rows of ``DATASET[:CONFIG][:SPLIT]`` (streamed; calibration reads only what it needs)."""
    try:
        import datasets
    except ImportError:
        raise ModelpressError("hf: sources need `pip install 'modelpress[datasets]'`") from None
    parts = spec.split(":")
    name, cfg = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None)
    split = parts[2] if len(parts) > 2 and parts[2] else default_split
    try:
        ds = datasets.load_dataset(name, cfg, split=split, streaming=True)
        out = []
        for rec in ds:
            if not isinstance(rec.get(field), str):
                raise ModelpressError(f"hf:{spec}: rows have no string {field!r} field (keys: {', '.join(rec)[:80]})")
            out.append(rec[field])
            if max_docs and len(out) >= max_docs:
                break
    except (OSError, ValueError, ConnectionError) as e:
        raise ModelpressError(f"cannot read hf:{spec}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return out


def describe_source(spec: str | Path) -> dict[str, Any]:
    """What a source is, for reports: its spec, and the sha256 of its file when it is one."""
    s = str(spec)
    if s.startswith("hf:"):
        return {"source": s, "sha256": None}
    p = _file(s, "file")
    out: dict[str, Any] = {"source": s, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
    if s.startswith("bundled:"):
        b = BUNDLED_TEXTS[s.split(":", 1)[1]]
        out.update(description=b.description, licence=b.licence)
    return out
