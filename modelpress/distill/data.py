"""Training sequences from a text source, shaped for the model that learns from them.

A language model trains on windows of the token stream (as calibration samples it, seeded); a
sentence encoder on sentences, one line of the text (or one JSONL row) each, padded to a common
length with an attention mask; teacher-generated samples one sequence each (:func:`sequences`).
"""
from __future__ import annotations

import random
from pathlib import Path

import torch

from ..calib.data import calibration_tokens
from ..core.errors import ModelpressError
from ..data.sources import read_documents
from ..models.loading import LoadedModel
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
