"""Our scorer against lm-evaluation-harness's own scoring (slow: importing the harness takes a while).

Skips when ``lm_eval`` is not installed (``pip install 'modelpress[lm-eval]'``).
"""
from __future__ import annotations

import json

import pytest

from modelpress.eval.loglik import DELIMITER, choice_metrics, score_choices
from modelpress.eval.tasks import ChoiceItem, read_task

pytestmark = pytest.mark.slow

ITEMS = [ChoiceItem("Once upon a time there was", ("a little robot", "a cat who could not count", "ten"), 0),
         ChoiceItem("The robot taught the cat ", ("to count to ten.", "to purr"), 1),  # trailing space moves
         ChoiceItem("", ("Every morning it counted the birds.", "birds the counted it morning Every."), 0),
         ChoiceItem("One day the robot met", ("a cat", "the clouds and the trees and the birds"), 0)]


def _lm_eval():
    return pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install 'modelpress[lm-eval]'")


def test_loglikelihoods_equal_the_harness(tiny_llama_dir):
    _lm_eval()
    import modelpress as mp
    from lm_eval.api.instance import Instance

    from modelpress.eval.harness import harness_model

    lm = mp.load(tiny_llama_dir)
    ours = score_choices(lm.module, lm.tokenizer, ITEMS, max_len=lm.max_length)
    reqs = [Instance(request_type="loglikelihood", doc={}, arguments=(it.context, DELIMITER + c), idx=j)
            for it in ITEMS for j, c in enumerate(it.choices)]
    theirs = harness_model(lm, batch_size=3).loglikelihood(reqs)
    flat = [(ll, g) for s in ours for ll, g in zip(s.loglik, s.greedy)]
    assert [ll for ll, _ in flat] == pytest.approx([ll for ll, _ in theirs], abs=1e-4)
    assert [g for _, g in flat] == [bool(g) for _, g in theirs]


def test_task_yaml_through_the_harness_gives_our_acc_and_acc_norm(tiny_llama_dir, tmp_path):
    _lm_eval()
    import modelpress as mp

    from modelpress.eval.harness import run_lm_eval

    data = tmp_path / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps({"context": it.context, "choices": list(it.choices), "label": it.label}) + "\n"
                            for it in ITEMS * 3))
    spec = tmp_path / "tiny_mc.yaml"
    spec.write_text(f"""task: mp_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    lm = mp.load(tiny_llama_dir)
    theirs = run_lm_eval(lm, [str(spec)])["mp_tiny_mc"]
    task = read_task(data)
    ours = choice_metrics(task.items, score_choices(lm.module, lm.tokenizer, task.items, max_len=lm.max_length))
    assert theirs["acc"] == pytest.approx(ours["acc"]) and theirs["acc_norm"] == pytest.approx(ours["acc_norm"])
