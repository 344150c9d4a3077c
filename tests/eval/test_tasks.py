"""Multiple-choice scoring (acc, acc_norm) against hand computations, the harness's token split, and
one-line errors for bad task files."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from modelpress.core.errors import ModelpressError
from modelpress.eval.loglik import choice_metrics, encode_pair, score_choices, score_requests
from modelpress.eval.tasks import ChoiceItem, TaskKind, read_task

from .toys import CharTokenizer, bigram, ids, lp


def _ll(model, prev: str | int, text: str) -> float:
    """Sum of log P(c_i | c_{i-1}) along ``text`` after ``prev``, by hand from the table."""
    total, p = 0.0, prev
    for c in text:
        total += lp(model, p, c)
        p = c
    return total


def test_acc_and_acc_norm_equal_hand_computation():
    # "a" is likelier in total, "bbb" per byte: acc and acc_norm must pick different answers
    m = bigram(1, {("x", " "): 6, (" ", "a"): 2, (" ", "b"): 3, ("b", "b"): 1})
    items = [ChoiceItem("x", ("a", "bbb"), 1), ChoiceItem("x", ("a", "bbb"), 0), ChoiceItem("qx", ("bbb", "c"), 0)]
    scores = score_choices(m, CharTokenizer(), items)
    for it, s in zip(items, scores):
        hand = [_ll(m, it.context[-1], " " + c) for c in it.choices]  # the leading space is scored too
        assert s.loglik == pytest.approx(hand, abs=1e-5)
        assert s.n_tokens == tuple(1 + len(c) for c in it.choices)
        assert s.pred == int(np.argmax(hand))
        assert s.pred_norm == int(np.argmax([h / len(c.encode()) for h, c in zip(hand, it.choices)]))
    assert scores[0].pred == 0 and scores[0].pred_norm == 1, "the toy must separate acc from acc_norm"
    got = choice_metrics(items, scores)
    hand_acc = np.mean([s.pred == it.label for s, it in zip(scores, items)])
    assert got == {"acc": pytest.approx(hand_acc), "acc_norm": pytest.approx(2 / 3), "n": 3}


def test_harness_split_moves_trailing_spaces_and_uses_prefix_for_empty_context():
    tok = CharTokenizer()
    assert encode_pair(tok, "ab  ", " c") == (ids("ab"), ids("   c"))
    assert encode_pair(tok, "", " c") == ([tok.bos_token_id], ids(" c"))
    m = bigram(2)
    s = score_choices(m, tok, [ChoiceItem("", ("ab", "c"), 0)])[0]
    assert s.loglik == pytest.approx([_ll(m, 0, " ab"), _ll(m, 0, " c")], abs=1e-5)


def test_utf8_bytes_normalise_acc_norm():
    """acc_norm divides by UTF-8 bytes: a 1-character, 2-byte choice counts 2."""
    class Tok(CharTokenizer):
        def encode(self, text):
            return [ids(c)[0] if c.isascii() else 5 for c in text]

    m = bigram(3, {(" ", "d"): 2})
    item = ChoiceItem("x", ("d", "\u00e9"), 0)
    s = score_choices(m, Tok(), [item])[0]
    hand = [_ll(m, "x", " d"), lp(m, "x", " ") + float(torch.log_softmax(m.table[ids(" ")[0]].double(), -1)[5])]
    assert s.loglik == pytest.approx(hand, abs=1e-5)
    assert s.pred_norm == int(np.argmax([hand[0] / 1, hand[1] / 2]))


def _tiny_llama_and_tok(tmp_path):
    from tests.conftest import make_tiny_llama, make_tokenizer

    from modelpress.models.tokenizers import HFTokenizer

    return make_tiny_llama(), HFTokenizer(make_tokenizer(tmp_path))


def test_batched_padded_scoring_equals_one_sequence_at_a_time(tmp_path):
    """Right-padded batches of mixed lengths give each request's own unpadded log-likelihood."""
    model, tok = _tiny_llama_and_tok(tmp_path)
    items = [ChoiceItem("Once upon a time there was", ("a little robot", "a cat", "the clouds and the trees"), 0),
             ChoiceItem("The robot taught", ("the cat to count to ten", "numbers"), 0),
             ChoiceItem("", ("One day the robot met a cat.", "Every morning"), 0)]
    scores = score_choices(model, tok, items, token_budget=4096)
    for it, s in zip(items, scores):
        for c, got in zip(it.choices, s.loglik):
            ctx, cont = encode_pair(tok, it.context, " " + c)
            x = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=x).logits[0].double(), -1)  # (T, V)
            ref = sum(float(logp[len(ctx) + k - 1, t]) for k, t in enumerate(cont))
            assert got == pytest.approx(ref, abs=1e-4)
    one_by_one = score_requests(model, [encode_pair(tok, "The robot taught", " numbers")], 256, token_budget=1)
    assert one_by_one[0][0] == pytest.approx(scores[1].loglik[1], abs=1e-4)


def test_truncation_keeps_the_last_max_len_plus_one_tokens():
    m = bigram(4)
    ctx, cont = ids("abcdefgh"), ids(" xy")
    got = score_requests(m, [(ctx, cont)], max_len=4)[0][0]
    assert got == pytest.approx(_ll(m, "h", " xy"), abs=1e-5)  # a bigram only needs the previous token


# ---- task files ---------------------------------------------------------------------------------

def _write(tmp_path: Path, rows: list, name: str = "t.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return p


def test_reads_choice_and_generation_files(tmp_path):
    t = read_task(_write(tmp_path, [{"context": "c", "choices": ["a", "b"], "label": 1, "slice": "s1"}, "",
                                    {"context": "d", "choices": ["x"], "label": 0}], "my_task.jsonl"))
    assert (t.name, t.kind, len(t.items)) == ("my_task", TaskKind.CHOICE, 2)
    assert t.items[0] == ChoiceItem("c", ("a", "b"), 1, "s1", 1) and t.items[1].line == 3
    g = read_task(_write(tmp_path, [{"prompt": "q", "answer": "a"}, {"prompt": "r", "answers": ["b", "c"]}], "g.jsonl"))
    assert g.kind is TaskKind.GENERATION and g.items[1].answers == ("b", "c")


GOOD = {"context": "c", "choices": ["a", "b"], "label": 0}


@pytest.mark.parametrize("bad, needle", [
    ({"context": "c", "choices": ["a", "b"], "label": 2}, "label 2 is outside the 2 choices"),
    ({"context": "c", "choices": ["a", "b"], "label": -1}, "label -1 is outside"),
    ({"context": "c", "choices": [], "label": 0}, "'choices' is empty"),
    ({"context": "c", "choices": ["a", ""], "label": 0}, "choice 1"),
    ({"context": "c", "choices": ["a", "b"], "label": True}, "'label' must be an integer"),
    ({"context": "c", "choices": ["a", "b"]}, "'label' must be an integer"),
    ({"context": 3, "choices": ["a", "b"], "label": 0}, "'context' is a number"),
    ('{"context": "c", "choices": ["a"', "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ({"context": "c", "choices": ["a", "b"], "label": 0, "slice": True}, "'slice' must be a string"),
    ({"context": "c", "choices": ["a", "b"], "label": 0, "slice": ["x"]}, "'slice' must be a string"),
])
def test_bad_rows_name_file_and_line(tmp_path, bad, needle):
    p = _write(tmp_path, [GOOD, "", bad])
    with pytest.raises(ModelpressError) as e:
        read_task(p)
    msg = str(e.value)
    assert f"{p}:3:" in msg and needle in msg and "\n" not in msg


@pytest.mark.parametrize("content, needle", [(b"", "empty"), (b"\n\n", "empty"), (b"\x00\x01bin", "binary"),
                                             (b"\xe9t\xe9\n", "not UTF-8"), (b'{"text": "x"}\n', "needs 'choices'")])
def test_bad_files_are_one_line_errors(tmp_path, content, needle):
    p = tmp_path / "t.jsonl"
    p.write_bytes(content)
    with pytest.raises(ModelpressError, match=needle) as e:
        read_task(p)
    assert str(p) in str(e.value)


def test_missing_and_folder(tmp_path):
    with pytest.raises(ModelpressError, match="not found"):
        read_task(tmp_path / "nope.jsonl")
    with pytest.raises(ModelpressError, match="folder"):
        read_task(tmp_path)


def test_limit_takes_the_first_items(tmp_path):
    p = _write(tmp_path, [GOOD] * 5 + [{"context": "c", "choices": ["a"], "label": 3}])
    assert len(read_task(p, limit=2).items) == 2 and len(read_task(p, limit=5).items) == 5
    with pytest.raises(ModelpressError, match=":6: label 3"):
        read_task(p)
