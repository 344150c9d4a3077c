"""Greedy generation and exact match; behavioural checks each firing and not firing; suite files."""
from __future__ import annotations

import json

import pytest
import torch

from modelpress.core.errors import ModelpressError
from modelpress.eval.behaviour import Prompt, checks, is_json, is_refusal, read_suite, run_suite
from modelpress.eval.generation import exact_match, greedy_ids, greedy_text, normalize_answer, score_generation
from modelpress.eval.tasks import GenerationItem

from .toys import CharTokenizer, bigram, ids


def chain(text: str, seed: int = 0, strength: float = 30.0):
    """A bigram whose greedy path from text[0] spells ``text`` (one strong transition per step)."""
    return bigram(seed, {(a, b): strength for a, b in zip(text, text[1:])})


def test_normalisation_and_exact_match():
    assert normalize_answer("  The  Eiffel-Tower!! ") == "eiffeltower"
    assert normalize_answer("An apple, a pear") == "apple pear"
    assert exact_match("The answer.", ["answer"]) and exact_match("4", ["four", "4"])
    assert not exact_match("42", ["4"])


def test_greedy_follows_the_table_and_stops_at_eos_and_until():
    m = chain("qworld\n>")  # '>' is EOS (id 1)
    tok = CharTokenizer()
    assert tok.decode(greedy_ids(m, ids("q"), 20, {1})) == "world\n"
    assert greedy_text(m, tok, "q", max_new_tokens=20, until=("\n",)) == "world"
    assert greedy_text(m, tok, "q", max_new_tokens=3) == "wor"
    assert greedy_text(m, tok, "q", max_new_tokens=20, until=("rl",)) == "wo"


def test_greedy_matches_transformers_generate(tmp_path):
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(seed=3)
    prompt = [5, 17, 42, 99, 3]
    ref = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12, eos_token_id=1,
                         pad_token_id=0)[0, len(prompt):].tolist()
    ref = ref[: ref.index(1)] if 1 in ref else ref
    assert greedy_ids(model, prompt, 12, {1}) == ref and len(ref) >= 3


def test_generation_scorer_exact_match():
    m = chain("qparis\n")
    items = [GenerationItem("q", ("Paris",)), GenerationItem("q", ("London",)), GenerationItem("q", ("pari",))]
    assert score_generation(m, CharTokenizer(), items) == [("paris", True), ("paris", False), ("paris", False)]


# ---- checks: each one firing and not firing ---------------------------------------------------------

def _one(expect: dict, text: str, n_tokens: int = 5, baseline: str | None = None):
    (c,) = checks(Prompt(prompt="p", expect=expect), text, n_tokens, baseline)
    return c


@pytest.mark.parametrize("expect, good, bad", [
    ({"contains": ["Paris"]}, "it is paris.", "it is lyon."),
    ({"not_contains": ["London"]}, "Paris", "LONDON it is"),
    ({"refusal": True}, "I'm sorry, but I can't help with that.", "Sure, here it is."),
    ({"refusal": False}, "Sure: 42.", "I cannot do that."),
    ({"min_chars": 3}, "abc", "ab"),
    ({"max_chars": 3}, "abc", "abcd"),
    ({"valid_json": True}, '```json\n{"a": [1, 2]}\n```', '{"a": [1, 2}'),
    ({"valid_json": False}, "plain words", "[1, 2]"),
])
def test_each_check_fires_and_does_not(expect, good, bad):
    assert _one(expect, good).passed, f"{expect} should pass on {good!r}"
    assert not _one(expect, bad).passed, f"{expect} should fail on {bad!r}"


def test_token_bounds_and_same_as_baseline():
    assert _one({"max_tokens": 4}, "x", n_tokens=4).passed and not _one({"max_tokens": 4}, "x", n_tokens=5).passed
    assert not _one({"min_tokens": 2}, "x", n_tokens=1).passed
    assert _one({"same_as_baseline": True}, "abc", baseline="abc").passed
    assert not _one({"same_as_baseline": True}, "abc", baseline="abd").passed
    assert checks(Prompt(prompt="p", expect={"same_as_baseline": True}), "abc", 3, None) == []  # no baseline


def test_refusal_and_json_detectors():
    assert is_refusal("As an AI language model, I ...") and not is_refusal("The AI said hello.")
    assert is_json(' {"k": "v"} ') and is_json("```\n[1]\n```") and not is_json("{k: v}")


def test_run_suite_reports_what_changed():
    tok = CharTokenizer()
    base, new = chain("qparis\n"), chain("qberlin\n", seed=1)
    suite = [Prompt(prompt="q", id="capital", max_new_tokens=5,
                    expect={"same_as_baseline": True, "contains": ["par"], "max_chars": 10})]
    rep = run_suite(new, tok, suite, baseline=base)
    row = rep["prompts"][0]
    assert (row["output"], row["baseline_output"], row["same_output"]) == ("berli", "paris", False)
    assert row["regressed"] == ["contains:par"] and row["fixed"] == [] and not row["passed"]
    failing = {c["name"] for c in row["checks"] if not c["passed"]}
    assert failing == {"same_as_baseline", "contains:par"}
    assert rep["summary"] == {"prompts": 1, "prompts_passed": 0, "checks": 3, "checks_passed": 1,
                              "outputs_changed": 1, "regressions": 1, "fixes": 0, "baseline_checks_passed": 2}
    alone = run_suite(base, tok, suite)
    assert alone["prompts"][0]["passed"] and "same_output" not in alone["prompts"][0]


def test_suite_files_yaml_and_jsonl(tmp_path):
    y = tmp_path / "s.yaml"
    y.write_text("prompts:\n  - id: a\n    prompt: hi\n    expect: {contains: [x], refusal: false}\n  - prompt: yo\n")
    got = read_suite(y)
    assert [p.id for p in got] == ["a", None] and got[0].expect.contains == ["x"]
    j = tmp_path / "s.jsonl"
    j.write_text(json.dumps({"prompt": "hi", "expect": {"valid_json": True}}) + "\n")
    assert read_suite(j)[0].expect.valid_json is True


@pytest.mark.parametrize("name, text, needle", [
    ("s.yaml", "- prompt: hi\n  expect: {contians: [x]}\n", "prompts[0]: expect.contians"),
    ("s.yaml", "- prompt: hi\n- 3\n", "prompts[1]: expected a mapping"),
    ("s.yaml", "- prompt: ''\n", "prompts[0]: prompt"),
    ("s.yaml", "", "empty suite"),
    ("s.yaml", "prompts: [\n", "invalid YAML"),
    ("s.jsonl", '{"prompt": "a"}\n{"prompt": \n', ":2: invalid JSON"),
    ("s.jsonl", '{"prompt": "a", "max_new_tokens": 0}\n', "line 1: max_new_tokens"),
])
def test_bad_suites_are_one_line_errors(tmp_path, name, text, needle):
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(ModelpressError) as e:
        read_suite(p)
    assert needle in str(e.value) and str(p) in str(e.value) and "\n" not in str(e.value)
