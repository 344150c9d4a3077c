"""Training sequences from a text source, shaped for the model that learns from them.

A language model trains on windows of the token stream (as calibration samples it, seeded); a
sentence encoder on sentences, one line of the text (or one JSONL row) each, padded to a common
length with an attention mask; teacher-generated samples one sequence each (:func:`sequences`);
labelled sentence pairs for a task loss (``pair-cosine``) as :class:`SentencePairs`.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..calib.data import calibration_tokens
from ..core.errors import ModelpressError
from ..data.sources import read_documents
from ..models.loading import LoadedModel
from .losses import Batch
from .trainer import TrainData


def training_data(lm: LoadedModel, source: str | Path, n_samples: int, seq_len: int, seed: int = 0,
                  language_model: bool = True) -> TrainData:
    """``n_samples`` training sequences of at most ``seq_len`` tokens from ``source``."""
    if lm.tokenizer is None:
        raise ModelpressError("training needs a tokenizer, and this model has none")
    if language_model:
        bos = lm.tokenizer.bos_token_id if lm.add_bos else None
        ids = calibration_tokens(lm.tokenizer, source, n_samples, seq_len, seed, bos_token_id=bos, role="train")
        return TrainData(ids, source=str(source))
    return _sentences(lm, source, n_samples, seq_len, seed)


def sequences(lm: LoadedModel, texts: list[str], seq_len: int) -> TrainData:
    """One training sequence per text (BOS first when the model uses one), cut at ``seq_len`` tokens
    and right-padded with a mask: a generated sample stays whole instead of running into the next."""
    if lm.tokenizer is None:
        raise ModelpressError("training needs a tokenizer, and this model has none")
    bos = [lm.tokenizer.bos_token_id] if lm.add_bos and lm.tokenizer.bos_token_id is not None else []
    rows = [r for r in ((bos + lm.tokenizer.encode(t))[:seq_len] for t in texts) if len(r) >= 2]
    if not rows:
        raise ModelpressError("no training sequence of at least 2 tokens in the given texts")
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])  # (N, width); 0 pads, masked out
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return TrainData(ids, mask)


def _sentences(lm: LoadedModel, source: str | Path, n_samples: int, seq_len: int, seed: int) -> TrainData:
    lines = [ln.strip() for doc in read_documents(source) for ln in doc.splitlines() if ln.strip()]
    if len(lines) < n_samples:
        raise ModelpressError(f"training text {source} has {len(lines)} non-empty lines, fewer than the "
                              f"{n_samples} sentences asked (lower --train-samples)")
    random.Random(seed).shuffle(lines)
    tok = getattr(lm.tokenizer, "tok", None)
    if tok is None:
        raise ModelpressError("sentence training needs a Hugging Face tokenizer")
    enc = tok(lines[:n_samples], padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
    return TrainData(enc["input_ids"], enc["attention_mask"].to(torch.long), source=str(source), trim_padding=True)


@dataclass
class SentencePairs(TrainData):
    """Labelled sentence pairs: one sample is a pair, so a batch of P pairs is 2P sentences.

    ``input_ids`` / ``attention_mask`` (2N, L) hold the N first sentences, then the N second ones
    (row i pairs with row N + i); ``scores`` (N,) is each pair's target, which a batch carries in
    ``targets``. The batch lays the pairs out as :class:`~.losses.PairCosineLoss` reads them: the
    first sentences, then the second ones, each encoded on its own.

    Example:
        >>> data = sentence_pairs(lm, ["a cat"], ["a dog"], [0.6])  # doctest: +SKIP
        >>> data.batch(torch.tensor([0])).targets                    # doctest: +SKIP
        tensor([0.6000])
    """

    scores: torch.Tensor | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scores is None or self.scores.dim() != 1 or 2 * len(self.scores) != self.input_ids.shape[0]:
            got = None if self.scores is None else tuple(self.scores.shape)
            raise ModelpressError(f"sentence pairs need one score per pair: {self.input_ids.shape[0]} sentences "
                                  f"(first sentences, then second ones) and scores of shape {got}")

    def __len__(self) -> int:
        return len(self.scores)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """The sentence rows of pairs ``idx``: their first sentences, then their second ones (2P,)."""
        return torch.cat([idx, idx + len(self)])

    def batch(self, idx: torch.Tensor) -> Batch:
        b = super().batch(self.rows(idx))
        return Batch(b.input_ids, b.attention_mask, None, {"index": idx}, self.scores[idx])

    def tokens(self, idx: torch.Tensor) -> int:
        return super().tokens(self.rows(idx))


def sentence_pairs(lm: LoadedModel, first: Sequence[str], second: Sequence[str], scores: Sequence[float],
                   seq_len: int = 128) -> SentencePairs:
    """Tokenise labelled pairs (each sentence cut at ``seq_len`` tokens) as :class:`SentencePairs`;
    ``scores`` are the targets as the loss reads them (STS-B for ``pair-cosine``: gold / 5)."""
    if not len(first) == len(second) == len(scores) or not len(first):
        raise ModelpressError(f"sentence pairs: {len(first)} first sentences, {len(second)} second ones and "
                              f"{len(scores)} scores (need the same number, at least one)")
    tok = getattr(lm.tokenizer, "tok", None)
    if tok is None:
        raise ModelpressError("sentence-pair training needs a Hugging Face tokenizer")
    enc = tok(list(first) + list(second), padding=True, truncation=True, max_length=seq_len, return_tensors="pt")
    return SentencePairs(enc["input_ids"], enc["attention_mask"].to(torch.long), trim_padding=True,
                         scores=torch.tensor(list(scores), dtype=torch.float32))
