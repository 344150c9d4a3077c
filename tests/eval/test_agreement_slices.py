"""Flip rate, next-token KL and top-1 agreement against hand computations; slice tables and flags."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from modelpress.core.errors import ModelpressError
from modelpress.eval.agreement import flips, next_token_agreement
from modelpress.eval.slices import derived_slices, quantile_buckets, rare_rates, slice_table

from .toys import bigram, ids


def test_flip_rate_counts_changes_either_way():
    base, new, y = [0, 1, 2, 3, 0, 1], [0, 2, 2, 1, 1, 1], [0, 1, 1, 3, 1, 2]
    got = flips(base, new, y)
    # changed: items 1 (right->wrong), 2 (no: same), 3 (right->wrong), 4 (wrong->right): 3 of 6
    assert got == {"flip_rate": 0.5, "flips": 3, "n": 6, "correct_to_wrong": 2, "wrong_to_correct": 1}
    assert flips([1, 1], [1, 1])["flip_rate"] == 0.0
    with pytest.raises(ModelpressError):
        flips([1], [1, 2])


def test_kl_and_top1_equal_hand_computation():
    a, b = bigram(0, {("a", "b"): 4}), bigram(1, {("a", "b"): 4})
    text = ids("abcab cba abba caab bc")
    res = next_token_agreement(b, a, text, seq_len=8)  # baseline a, model b; windows of 8, last 6 tokens dropped
    kls, agree = [], []
    for t in text[: 8 * (len(text) // 8)]:
        p = torch.softmax(a.table[t].double(), -1).numpy()
        q = torch.softmax(b.table[t].double(), -1).numpy()
        kls.append(float(np.sum(p * (np.log(p) - np.log(q)))))
        agree.append(float(p.argmax() == q.argmax()))
    assert res["positions"] == len(kls) == 16 and res["windows"] == 2
    assert res["kl"] == pytest.approx(np.mean(kls), rel=1e-5)
    assert res["top1_agreement"] == pytest.approx(np.mean(agree))
    assert 0 < res["top1_agreement"] < 1, "the toy should agree on some positions and not others"
    same = next_token_agreement(a, a, text, seq_len=8)
    assert same["kl"] == pytest.approx(0, abs=1e-6) and same["top1_agreement"] == 1.0


def test_quantile_buckets_and_rare_rates_by_hand():
    labels = quantile_buckets([1, 2, 3, 4, 5, 6, 7, 8, 9], 3, "tokens", "{:.0f}")
    assert labels == ["tokens 1-3"] * 3 + ["tokens 4-6"] * 3 + ["tokens 7-9"] * 3
    assert quantile_buckets([5, 5, 5, 5], 3, "n") == ["n 5-5"] * 4  # ties: one bucket, not three
    ref = Counter({1: 50, 2: 49, 3: 1})  # 100 tokens; rare below 5% = fewer than 5
    assert rare_rates([[1, 1, 3, 9], [2, 1]], ref, 100, rare_below=0.05) == [0.5, 0.0]
    d = derived_slices([[1], [1, 2], [3, 3, 3]], ref, 100, n_buckets=3, rare_below=0.05)
    assert d["length"] == ["tokens 1-1", "tokens 2-2", "tokens 3-3"]
    assert d["rare_tokens"] == ["rare % 0.0-0.0", "rare % 0.0-0.0", "rare % 100.0-100.0"]


def _items(rng, n_per_slice=60, slices=("a", "b", "c", "d"), acc=0.8):
    labels = [s for s in slices for _ in range(n_per_slice)]
    base = (rng.random(len(labels)) < acc).astype(float)
    return labels, base


def test_planted_regression_on_one_slice_is_flagged():
    rng = np.random.default_rng(0)
    labels, base = _items(rng)
    new = base.copy()
    in_c = np.array([lab == "c" for lab in labels])
    new[in_c & (base == 1) & (rng.random(len(base)) < 0.6)] = 0  # slice c loses ~60% of its right answers
    t = slice_table(base, new, labels)
    assert t["flagged"] == ["c"]
    assert t["slices"]["c"]["delta"] < t["overall"]["delta"] < 0
    assert t["slices"]["a"]["delta"] == 0 and t["slices"]["a"]["baseline"] == pytest.approx(base[:60].mean())


@pytest.mark.parametrize("seed", range(5))
def test_uniform_degradation_flags_nothing(seed):
    rng = np.random.default_rng(seed)
    labels, base = _items(rng)
    new = base.copy()
    new[(base == 1) & (rng.random(len(base)) < 0.25)] = 0  # every slice loses ~25% alike
    t = slice_table(base, new, labels)
    assert t["overall"]["delta"] < -0.1 and t["flagged"] == []


def test_lower_is_better_metric_and_no_baseline():
    labels = ["x"] * 10 + ["y"] * 10
    base = [1.0] * 20
    new = [1.0] * 10 + [3.0] * 10  # a loss: y got worse
    assert slice_table(base, new, labels, higher_is_better=False)["flagged"] == ["y"]
    # read as higher-is-better, y improved and x stayed: an unchanged slice is never "degraded"
    assert slice_table(base, new, labels, higher_is_better=True)["flagged"] == []
    plain = slice_table(None, new, labels)
    assert plain["slices"]["y"] == {"n": 10, "value": 3.0} and plain["flagged"] == []
