import math

import torch
import torch.nn as nn

from modelpress.eval.perplexity import perplexity, windows


class Bigram(nn.Module):
    """A model whose next-token distribution is a fixed table: PPL has a closed form."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(table.log())

    def forward(self, ids):
        return self.logits[ids]


def test_non_overlapping_matches_closed_form():
    torch.manual_seed(0)
    V = 7
    table = torch.softmax(torch.randn(V, V), -1)
    ids = torch.randint(0, V, (1000,))
    res = perplexity(Bigram(table), ids, 100)
    # reference: every window drops its first token as a target
    nll = [-table[ids[i - 1], ids[i]].log() for w in range(10) for i in range(w * 100 + 1, (w + 1) * 100)]
    assert res.windows == 10 and res.predicted == 990
    assert math.isclose(res.perplexity, math.exp(float(torch.stack(nll).mean())), rel_tol=1e-5)


def test_sliding_window_scores_each_target_once():
    wins = windows(1000, 100, 50)
    scored = []
    for b, e, first in wins:
        scored += list(range(b + max(first, 1), e))
    assert sorted(scored) == list(range(1, 1000))


def test_bos_windows():
    torch.manual_seed(1)
    V = 5
    table = torch.softmax(torch.randn(V, V), -1)
    ids = torch.randint(0, V, (400,))
    res = perplexity(Bigram(table), ids, 101, bos_token_id=0)
    assert res.windows == 4 and res.predicted == 400  # BOS lets every text token be scored
