"""Behavioural checks: prompts with expectations, run on a model and its baseline, reported prompt by prompt.

A suite is YAML (a list, or ``{prompts: [...]}``) or JSONL (one prompt a line):

    - id: capital
      prompt: "What is the capital of France?"
      chat: true                    # wrap in the tokenizer's chat template (default false)
      max_new_tokens: 48
      expect:
        same_as_baseline: true      # greedy output identical to the baseline's
        contains: ["Paris"]         # each must appear (case-insensitive)
        not_contains: ["London"]    # none may appear (case-insensitive)
        refusal: false              # true: must refuse; false: must not
        min_chars: 1
        max_chars: 400              # also min_tokens / max_tokens (generated tokens)
        valid_json: false           # the output (``` fences allowed) parses as JSON

Unknown keys are refused with the prompt's position, so a misspelt check never silently passes.
A refusal is recognised by the usual phrases ("I can't", "I'm sorry", "as an AI" ...) at the start
of the answer (:data:`REFUSAL_PATTERNS`).

Example:
    >>> suite = read_suite("checks.yaml")                                # doctest: +SKIP
    >>> report = run_suite(model, tok, suite, baseline=base)             # doctest: +SKIP
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml
from pydantic import Field, ValidationError

from ..core.config import Config
from ..core.errors import ModelpressError
from .generation import greedy_ids, eos_ids
from .tasks import read_lines

#: Phrases that open a refusal (matched case-insensitively within the first 200 characters).
REFUSAL_PATTERNS = (
    r"\bI(?:'m| am) (?:sorry|afraid|unable|not able)\b", r"\bI (?:can(?:'|no)t|cannot|won't|will not)\b",
    r"\bas an AI\b", r"\bI(?:'m| am) not (?:comfortable|going to|allowed)\b", r"\bI must decline\b",
    r"\b(?:sorry|unfortunately), (?:but )?I\b",
)
_REFUSAL = re.compile("|".join(REFUSAL_PATTERNS), re.IGNORECASE)
_FENCE = re.compile(r"^```(?:json)?\s*\n?(.*?)\n?```$", re.DOTALL)


class Expect(Config):
    """What a prompt's output must satisfy; a check left unset is not run."""

    same_as_baseline: bool | None = None
    contains: list[str] = Field(default_factory=list)
    not_contains: list[str] = Field(default_factory=list)
    refusal: bool | None = None
    min_chars: int | None = Field(default=None, ge=0)
    max_chars: int | None = Field(default=None, ge=0)
    min_tokens: int | None = Field(default=None, ge=0)
    max_tokens: int | None = Field(default=None, ge=0)
    valid_json: bool | None = None


class Prompt(Config):
    """One behavioural prompt."""

    prompt: str = Field(min_length=1)
    id: str | None = None
    chat: bool = False
    max_new_tokens: int = Field(default=64, ge=1, le=4096)
    expect: Expect = Field(default_factory=Expect)


@dataclass(frozen=True)
class Check:
    """One expectation on one output."""

    name: str
    passed: bool
    detail: str


def is_refusal(text: str) -> bool:
    """Whether ``text`` opens with a refusal phrase."""
    return bool(_REFUSAL.search(text[:200]))


def is_json(text: str) -> bool:
    """Whether the stripped text (optionally inside ``` fences) parses as JSON."""
    t = text.strip()
    m = _FENCE.match(t)
    try:
        json.loads(m.group(1) if m else t)
    except ValueError:
        return False
    return True


def checks(p: Prompt, text: str, n_tokens: int, baseline_text: str | None) -> list[Check]:
    """Every expectation ``p`` sets, evaluated on ``text`` (``same_as_baseline`` needs ``baseline_text``)."""
    e, low, out = p.expect, text.lower(), []
    if e.same_as_baseline is not None and baseline_text is not None:
        same = text == baseline_text
        out.append(Check("same_as_baseline", same == e.same_as_baseline, "identical" if same else "differs"))
    out += [Check(f"contains:{s}", s.lower() in low, "") for s in e.contains]
    out += [Check(f"not_contains:{s}", s.lower() not in low, "") for s in e.not_contains]
    if e.refusal is not None:
        r = is_refusal(text)
        out.append(Check("refusal" if e.refusal else "no_refusal", r == e.refusal, "refused" if r else "answered"))
    for name, value, low_b, high_b in (("chars", len(text), e.min_chars, e.max_chars),
                                       ("tokens", n_tokens, e.min_tokens, e.max_tokens)):
        if low_b is not None or high_b is not None:
            ok = (low_b is None or value >= low_b) and (high_b is None or value <= high_b)
            out.append(Check(f"length_{name}", ok, f"{value} {name} (bounds {low_b}..{high_b})"))
    if e.valid_json is not None:
        out.append(Check("valid_json", is_json(text) == e.valid_json, ""))
    return out


def read_suite(path: str | Path) -> list[Prompt]:
    """Prompts of a YAML or JSONL suite; a bad entry is an error naming the file and entry."""
    p = Path(path).expanduser()
    lines = read_lines(p)
    if p.name.removesuffix(".gz").endswith(".jsonl"):
        entries = [(f"line {i}", _json(p, i, line)) for i, line in enumerate(lines, 1) if line.strip()]
    else:
        entries = [(f"prompts[{i}]", e) for i, e in enumerate(_yaml_list(p, "\n".join(lines)))]
    if not entries:
        raise ModelpressError(f"{p} holds no prompts (empty suite)")
    return [_prompt(p, where, e) for where, e in entries]


def _json(p: Path, i: int, line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise ModelpressError(f"{p}:{i}: invalid JSON ({e.msg})") from None


def _yaml_list(p: Path, text: str) -> list[Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ModelpressError(f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
    data = data.get("prompts") if isinstance(data, dict) else data
    if data is None:
        return []
    if not isinstance(data, list):
        raise ModelpressError(f"{p}: a suite is a list of prompts (or {{prompts: [...]}}), got {type(data).__name__}")
    return data


def _prompt(p: Path, where: str, entry: Any) -> Prompt:
    if not isinstance(entry, dict):
        raise ModelpressError(f"{p}: {where}: expected a mapping with a 'prompt', got {type(entry).__name__}")
    try:
        return Prompt.model_validate(entry)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise ModelpressError(f"{p}: {where}: {loc}: {err['msg']}") from None


def generate(model: Any, tok: Any, p: Prompt, bos: int | None = None) -> tuple[str, int]:
    """(greedy output text, generated tokens) for one prompt."""
    text = p.prompt
    if p.chat:
        if not hasattr(tok, "apply_chat_template"):
            raise ModelpressError(f"prompt {p.id or p.prompt[:30]!r} asks for the chat template, and this tokenizer has none")
        text = tok.apply_chat_template([{"role": "user", "content": p.prompt}], add_generation_prompt=True)
    ids = ([bos] if bos is not None and not p.chat else []) + list(tok.encode(text))
    new = greedy_ids(model, ids, p.max_new_tokens, eos_ids(model, tok))
    return tok.decode(new), len(new)


def run_suite(model: Any, tok: Any, suite: Sequence[Prompt], *, baseline: Any = None, bos: int | None = None,
              progress: Any = None) -> dict[str, Any]:
    """Generate for each prompt (and on the baseline), run its checks, and say what changed."""
    rows = []
    for i, p in enumerate(progress(suite, "behaviour") if progress else suite):
        text, n = generate(model, tok, p, bos)
        row: dict[str, Any] = {"id": p.id or str(i), "prompt": p.prompt, "output": text}
        b_text = None
        if baseline is not None:
            b_text, b_n = generate(baseline, tok, p, bos)
            row.update(baseline_output=b_text, same_output=text == b_text)
            b_checks = {c.name: c for c in checks(p, b_text, b_n, None)}
        row["checks"] = [vars(c) for c in checks(p, text, n, b_text)]
        if baseline is not None:
            row["baseline_checks"] = [vars(c) for c in b_checks.values()]
            row["regressed"] = [c["name"] for c in row["checks"] if c["name"] in b_checks
                                and b_checks[c["name"]].passed and not c["passed"]]
            row["fixed"] = [c["name"] for c in row["checks"] if c["name"] in b_checks
                            and not b_checks[c["name"]].passed and c["passed"]]
        row["passed"] = all(c["passed"] for c in row["checks"])
        rows.append(row)
    return {"summary": _summary(rows, baseline is not None), "prompts": rows}


def _summary(rows: list[dict[str, Any]], with_baseline: bool) -> dict[str, Any]:
    n_checks = sum(len(r["checks"]) for r in rows)
    out: dict[str, Any] = {"prompts": len(rows), "prompts_passed": sum(r["passed"] for r in rows),
                           "checks": n_checks, "checks_passed": sum(c["passed"] for r in rows for c in r["checks"])}
    if with_baseline:
        out.update(outputs_changed=sum(not r["same_output"] for r in rows),
                   regressions=sum(len(r["regressed"]) for r in rows), fixes=sum(len(r["fixed"]) for r in rows),
                   baseline_checks_passed=sum(c["passed"] for r in rows for c in r["baseline_checks"]))
    return out


def markdown(report: dict[str, Any]) -> list[str]:
    """Prompt-by-prompt Markdown lines: what each model said and which checks changed."""
    s = report["summary"]
    lines = ["## Behaviour", "", f"{s['prompts_passed']}/{s['prompts']} prompts pass all checks "
             f"({s['checks_passed']}/{s['checks']} checks)" + (
                 f"; outputs changed: {s['outputs_changed']}, regressions: {s['regressions']}, fixes: {s['fixes']}"
                 if "outputs_changed" in s else ""), "",
             "| id | passed | changed output | regressed | failing checks |", "|---|---|---|---|---|"]
    for r in report["prompts"]:
        failing = ", ".join(c["name"] for c in r["checks"] if not c["passed"]) or "-"
        lines.append(f"| {r['id']} | {'yes' if r['passed'] else 'no'} | "
                     f"{'-' if 'same_output' not in r else ('no' if r['same_output'] else 'yes')} | "
                     f"{', '.join(r.get('regressed', [])) or '-'} | {failing} |")
    return lines + [""]
