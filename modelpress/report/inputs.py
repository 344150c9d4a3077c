"""Reading what ``modelpress report`` summarises: eval JSONs, compress reports, bench JSONs and searches.

Each input is a path, or ``LABEL=PATH``. Inputs with the same label are one model (a *variant*):
its eval JSON gives quality (perplexity, tasks, slices, behaviour), its compress report the
per-layer formats, its bench JSON latency and memory. A path's kind is read from its content:

  * a search: ``search.json`` (or a folder holding one) written by ``modelpress search``;
  * a compress report: has ``layers`` and ``recipe`` (``report.json`` of a ``compress`` output,
    or the output folder itself);
  * a bench: has ``decode_tokens_per_s`` (``modelpress bench --json``, or
    :func:`modelpress.eval.perf.profile_model`'s result);
  * an eval JSON: anything with ``perplexity`` or ``tasks`` (``modelpress eval --json``).

Without a label, a variant is named by the file's ``model`` field (the recipe name for a compress
report).

Example:
    >>> inp = read_inputs(["fp32=fp32.json", "w4=w4.eval.json", "w4=out/w4"])   # doctest: +SKIP
    >>> [v.label for v in inp.variants]                                          # doctest: +SKIP
    ['fp32', 'w4']
"""
from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import ModelpressError


class InputKind(str, enum.Enum):
    """What a report input file holds."""

    EVAL = "eval"
    COMPRESS = "compress"
    BENCH = "bench"
    SEARCH = "search"


@dataclass
class Variant:
    """One model as the report sees it: its eval, compress report and bench results (any may be absent).

    The properties read each figure from the first input that has it (size: the eval's, else the
    compress report's, else the bench's), so one number is never taken from two places.
    """

    label: str
    eval: dict[str, Any] | None = None
    compress: dict[str, Any] | None = None
    bench: dict[str, Any] | None = None
    sources: list[str] = field(default_factory=list)

    def _first(self, key: str) -> Any:
        for d in (self.eval, self.compress, _compress_eval(self.compress), self.bench):
            if d and d.get(key) is not None:
                return d[key]
        return None

    @property
    def size_bytes(self) -> int | None:
        return self._first("size_bytes")

    @property
    def memory_bytes(self) -> int | None:
        return self._first("memory_bytes")

    @property
    def perplexity(self) -> float | None:
        return self._first("perplexity")

    @property
    def bits_per_weight(self) -> float | None:
        return (self.compress or {}).get("mean_bits_per_weight")

    @property
    def tasks(self) -> dict[str, Any]:
        return (self.eval or {}).get("tasks") or {}

    @property
    def behaviour(self) -> dict[str, Any] | None:
        return (self.eval or {}).get("behaviour")

    @property
    def layers(self) -> list[dict[str, Any]]:
        return (self.compress or {}).get("layers") or []

    def perf(self, key: str) -> Any:
        """A bench measurement (``decode_tokens_per_s``, ``ttft_s``, ``peak_rss_bytes`` ...) or None."""
        return (self.bench or {}).get(key)


@dataclass
class Inputs:
    """Every variant in the order first named, and every search."""

    variants: list[Variant]
    searches: list[dict[str, Any]]

    def variant(self, label: str) -> Variant:
        """The variant called ``label`` (a ModelpressError lists the labels there are)."""
        for v in self.variants:
            if v.label == label:
                return v
        raise ModelpressError(f"--baseline {label!r} is none of the inputs' labels: {', '.join(v.label for v in self.variants)}")


def _compress_eval(rep: dict[str, Any] | None) -> dict[str, Any] | None:
    """The compressed model's numbers of a compress report run with --eval-data."""
    return ((rep or {}).get("eval") or {}).get("compressed")


def kind_of(data: Any, path: str) -> InputKind:
    """Which kind of result ``data`` (read from ``path``) is; a ModelpressError names the path otherwise."""
    if isinstance(data, dict):
        if data.get("kind") == "modelpress-search":
            return InputKind.SEARCH
        if "layers" in data and "recipe" in data:
            return InputKind.COMPRESS
        if "decode_tokens_per_s" in data:
            return InputKind.BENCH
        if "perplexity" in data or "tasks" in data or "behaviour" in data:
            return InputKind.EVAL
    raise ModelpressError(f"{path}: not an eval JSON, compress report, bench JSON or search result of modelpress")


def _resolve(path: Path) -> Path:
    """A folder stands for the result file inside it (search.json, or a compress output's report.json)."""
    if path.is_dir():
        for name in ("search.json", "report.json"):
            if (path / name).is_file():
                return path / name
        raise ModelpressError(f"{path}: a folder without search.json or report.json")
    if not path.is_file():
        raise ModelpressError(f"report input {path} does not exist")
    return path


def read_json(path: Path) -> Any:
    """Parsed JSON, or a ModelpressError naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelpressError(f"{path}: not a JSON file ({type(e).__name__}: {e})") from None


def _default_label(kind: InputKind, data: dict[str, Any], path: Path) -> str:
    if kind is InputKind.COMPRESS:
        return str((data.get("recipe") or {}).get("name") or path.parent.name)
    model = data.get("model")
    if isinstance(model, dict):  # a bench JSON holds the measured model's record under "model"
        model = model.get("model")
    return str(model or path.stem)


def _bench_record(data: dict[str, Any]) -> dict[str, Any]:
    """``modelpress bench --json`` keeps the details under ``model``; profile_model's result is flat."""
    return data["model"] if isinstance(data.get("model"), dict) else data


def read_inputs(specs: list[str]) -> Inputs:
    """Read every ``[LABEL=]PATH`` (see the module docstring)."""
    variants: dict[str, Variant] = {}
    searches: list[dict[str, Any]] = []
    for spec in specs:
        label, _, raw = spec.partition("=") if "=" in spec and not Path(spec).exists() else ("", "", spec)
        path = _resolve(Path(raw))
        data = read_json(path)
        kind = kind_of(data, str(path))
        if kind is InputKind.SEARCH:
            searches.append(data | {"path": str(path)})
            continue
        label = label or _default_label(kind, data, path)
        v = variants.setdefault(label, Variant(label))
        attr = kind.value
        if getattr(v, attr) is not None:
            raise ModelpressError(f"two {attr} inputs for {label!r} ({v.sources[-1]} and {path}); label them LABEL=PATH")
        setattr(v, attr, _bench_record(data) if kind is InputKind.BENCH else data)
        v.sources.append(str(path))
    if not variants and not searches:
        raise ModelpressError("modelpress report: no inputs")
    return Inputs(list(variants.values()), searches)


def pick_baseline(inputs: Inputs, label: str | None) -> Variant | None:
    """The reference variant: the one named, else the largest on disk (the uncompressed model)."""
    if label is not None:
        return inputs.variant(label)
    sized = [v for v in inputs.variants if v.size_bytes]
    return max(sized, key=lambda v: v.size_bytes) if sized else None
