"""Hand-checkable toys for the evaluation tests: a character tokenizer and a bigram 'language model'
whose log-probabilities are a table we can read by hand."""
from __future__ import annotations

import torch
import torch.nn as nn

ALPHABET = "<>" + " abcdefghijklmnopqrstuvwxyz.\n{}\":0123456789"  # id 0 = BOS '<', id 1 = EOS '>'


class CharTokenizer:
    """One token per character of :data:`ALPHABET`; BOS = 0, EOS = 1."""

    bos_token_id = 0
    eos_token_id = 1

    def encode(self, text: str) -> list[int]:
        return [ALPHABET.index(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(ALPHABET[i] for i in ids if i > 1)


def ids(text: str) -> list[int]:
    return CharTokenizer().encode(text)


class Bigram(nn.Module):
    """``logits[..., t] = table[prev, t]``: the next-token log-probs are ``log_softmax(table[prev])``."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table.clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, V)
        return self.table[x]


def bigram(seed: int = 0, sharp: dict[tuple[str, str], float] | None = None) -> Bigram:
    """A random bigram table, with ``sharp[(a, b)]`` added to the logit of b after a."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(len(ALPHABET), len(ALPHABET), generator=g)
    for (a, b), v in (sharp or {}).items():
        t[ALPHABET.index(a), ALPHABET.index(b)] += v
    return Bigram(t)


def lp(model: Bigram, prev: str | int, nxt: str) -> float:
    """log P(nxt | prev) read off the table."""
    p = prev if isinstance(prev, int) else ALPHABET.index(prev)
    return float(torch.log_softmax(model.table[p].detach().double(), -1)[ALPHABET.index(nxt)])
