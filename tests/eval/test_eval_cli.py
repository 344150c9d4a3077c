"""``modelpress eval --task / --baseline / --behaviour`` end to end on a tiny Llama built in code."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelpress.cli.main import main
from tests.conftest import TEXT


def run(*argv) -> int:
    return main(["--quiet", *map(str, argv)])


@pytest.fixture(scope="module")
def task_file(tmp_path_factory) -> Path:
    sents = [s.strip() for s in TEXT[:400].split(".") if s.strip()]
    rows = []
    for i, s in enumerate(sents * 3):
        words = s.split()
        cut = max(2, len(words) // 2)
        other = sents[(i + 1) % len(sents)].split()[:3]
        rows.append({"context": " ".join(words[:cut]), "choices": [" ".join(words[cut:]), " ".join(other)],
                     "label": i % 2 and 1 or 0, "slice": f"s{i % 3}"})
    p = tmp_path_factory.mktemp("tasks") / "robot_story.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_task_with_baseline_and_data(tiny_llama_dir, tiny_text_file, task_file, tmp_path):
    out = tmp_path / "e.json"
    md = tmp_path / "e.md"
    assert run("eval", "--model", tiny_llama_dir, "--task", task_file, "--baseline", tiny_llama_dir, "--data",
               tiny_text_file, "--seq-len", "64", "--json", out, "--markdown", md) == 0
    res = json.loads(out.read_text())
    t = res["tasks"]["robot_story"]
    assert set(t) >= {"acc", "acc_norm", "n", "flip_rate", "baseline", "slices"}
    assert t["n"] == len(task_file.read_text().splitlines()) >= 12
    assert t["flip_rate"] == 0.0 and t["baseline"]["acc"] == t["acc"]  # the same model twice
    assert set(t["slices"]) == {"data", "length", "rare_tokens"} and set(t["slices"]["data"]["acc"]["slices"]) == {"s0", "s1", "s2"}
    assert res["perplexity"] > 1 and res["baseline"]["perplexity"] == pytest.approx(res["perplexity"])
    assert res["agreement"]["kl"] == pytest.approx(0, abs=1e-6) and res["agreement"]["top1_agreement"] == 1.0
    assert "## Tasks" in md.read_text() and "robot_story" in md.read_text()
    # the CLI's numbers are the scorer's
    import modelpress as mp
    from modelpress.eval.loglik import choice_metrics, score_choices
    from modelpress.eval.tasks import read_task

    lm, task = mp.load(tiny_llama_dir), read_task(task_file)
    direct = choice_metrics(task.items, score_choices(lm.module, lm.tokenizer, task.items))
    assert (t["acc"], t["acc_norm"]) == (direct["acc"], direct["acc_norm"])


def test_tasks_alone_skip_perplexity_and_behaviour_runs(tiny_llama_dir, task_file, tmp_path):
    suite = tmp_path / "suite.yaml"
    suite.write_text("- id: story\n  prompt: Once upon a time\n  max_new_tokens: 6\n  expect: {max_tokens: 6, valid_json: false}\n")
    out = tmp_path / "e.json"
    assert run("eval", "--model", tiny_llama_dir, "--task", task_file, "--limit", "4", "--behaviour", suite,
               "--json", out) == 0
    res = json.loads(out.read_text())
    assert "perplexity" not in res and res["tasks"]["robot_story"]["n"] == 4
    row = res["behaviour"]["prompts"][0]
    assert row["id"] == "story" and row["passed"] and {c["name"] for c in row["checks"]} == {"length_tokens", "valid_json"}


@pytest.mark.parametrize("content, needle", [
    ('{"context": "a", "choices": ["b"], "label": 1}\n', ":1: label 1 is outside the 1 choices"),
    ('{"context": "a", "choices": [], "label": 0}\n', ":1: 'choices' is empty"),
    ("", "holds no task items"),
    ('{"context": "a", "choices": ["b"], "label": 0}\nnot json\n', ":2: invalid JSON"),
])
def test_bad_task_file_is_one_line_naming_file_and_line(tiny_llama_dir, tmp_path, capsys, content, needle):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    assert run("eval", "--model", tiny_llama_dir, "--task", p, "--json", tmp_path / "e.json") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.jsonl" in err and needle in err
    assert not (tmp_path / "e.json").exists()


def test_baseline_with_another_tokenizer_refused(tiny_llama_dir, task_file, tmp_path, capsys):
    import shutil

    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    other = tmp_path / "other"
    shutil.copytree(tiny_llama_dir, other)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([TEXT], vocab_size=280, min_frequency=1, special_tokens=["<s>", "</s>"])
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>").save_pretrained(str(other))
    assert run("eval", "--model", tiny_llama_dir, "--task", task_file, "--baseline", other) == 2
    assert "another tokenizer" in capsys.readouterr().err


def test_lm_eval_absent_is_said_clearly(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    import modelpress.eval.harness as h

    monkeypatch.setattr(h, "available", lambda: False)
    assert run("eval", "--model", tiny_llama_dir, "--lm-eval", "hellaswag") == 2
    assert "lm-eval package, which is not installed" in capsys.readouterr().err
