"""Calibration data: N samples x L tokens drawn (seeded) from a text, JSONL or HF dataset source."""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.errors import ModelpressError
from ..data.sources import read_documents


def read_calibration_texts(source: str | Path, text_field: str = "text", max_docs: int | None = None) -> list[str]:
    """Documents from a text file, JSONL, ``hf:DATASET[:CONFIG][:SPLIT]`` or ``bundled:NAME``
    (see :mod:`modelpress.data.sources`)."""
    return read_documents(source, text_field, max_docs)


@dataclass(frozen=True)
class Calibration:
    """Calibration token ids and where they came from (recorded in the report and the manifest).

    ``info``: ``source``, ``sha256`` of the source file, ``samples``, ``seq_len``, ``seed``,
    ``chat`` and ``tokens_sha256`` (the ids themselves).
    """

    ids: torch.Tensor  # (samples, seq_len)
    info: dict[str, Any]

    @classmethod
    def from_ids(cls, ids: torch.Tensor, source: str = "tensor") -> "Calibration":
        """Wrap ids made elsewhere (the Python API's ``calib=tensor``)."""
        return cls(ids, {"source": source, "sha256": None, "samples": int(ids.shape[0]),
                         "seq_len": int(ids.shape[1]), "seed": None, "chat": False, "tokens_sha256": tokens_sha256(ids)})


def tokens_sha256(ids: torch.Tensor) -> str:
    """sha256 of token ids as int64 (identical ids, identical digest)."""
    return hashlib.sha256(ids.detach().to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def sample_windows(ids: torch.Tensor, n_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``n_samples`` random windows of ``seq_len`` tokens from a 1-D id stream (GPTQ's sampler)."""
    if n_samples < 1 or seq_len < 2:
        raise ModelpressError(f"calibration needs at least 1 sample of 2 tokens, got {n_samples} x {seq_len}")
    if ids.numel() < seq_len + 1:
        raise ModelpressError(f"calibration text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seq_len - 1) for _ in range(n_samples)]
    return torch.stack([ids[s:s + seq_len] for s in starts])


#: calibration windows x tokens when nothing else says (GPTQ's usual 128 x 2048)
DEFAULT_CALIB_SAMPLES, DEFAULT_CALIB_SEQ_LEN = 128, 2048


def calibration_tokens(tokenizer: Any, source: str | Path, n_samples: int = DEFAULT_CALIB_SAMPLES,
                       seq_len: int = DEFAULT_CALIB_SEQ_LEN,
                       seed: int = 0, text_field: str = "text", bos_token_id: int | None = None,
                       chat: bool = False, role: str = "calib") -> torch.Tensor:
    """(n_samples, seq_len) token ids for calibration (``role`` "calib") or training ("train").

    Documents are tokenised, joined and cut into windows; too little text is an error that says how
    much there is, and which options ask for less (``--{role}-samples``), rather than silently
    repeating tokens. ``chat`` wraps each document as a user turn with the tokenizer's chat template.
    """
    if str(source).endswith(".safetensors"):
        return pretokenized(source, n_samples, seq_len)
    if tokenizer is None:
        raise ModelpressError("calibration needs a tokenizer, and this model has none")
    docs = read_calibration_texts(source, text_field, max_docs=max(4 * n_samples, 64))
    if chat:
        docs = [_chat(tokenizer, d) for d in docs]
    ids: list[int] = []
    need = n_samples * seq_len * 4  # enough stream for distinct windows without tokenising everything
    for d in docs:
        ids.extend(tokenizer.encode(d))
        if len(ids) >= need:
            break
    t = torch.tensor(ids, dtype=torch.long)
    if t.numel() < n_samples * seq_len:
        what = "training text" if role == "train" else "calibration source"
        raise ModelpressError(f"{what} {source} has {t.numel()} tokens; {n_samples} x {seq_len} "
                              f"= {n_samples * seq_len} asked (lower --{role}-samples / --{role}-seq-len)")
    win = sample_windows(t, n_samples, seq_len - (1 if bos_token_id is not None else 0), seed)
    if bos_token_id is not None:
        win = torch.cat([torch.full((n_samples, 1), bos_token_id, dtype=torch.long), win], dim=1)
    return win


def _chat(tokenizer: Any, text: str) -> str:
    apply = getattr(tokenizer, "apply_chat_template", None)
    tmpl = getattr(getattr(tokenizer, "tok", None), "chat_template", None)
    if apply is None or not tmpl:
        raise ModelpressError("--calib-chat asks for the chat template, but this tokenizer has none")
    return apply([{"role": "user", "content": text}])


def pretokenized(path: str | Path, n_samples: int, seq_len: int) -> torch.Tensor:
    """Token ids saved as a ``calib`` (N, L) tensor in a safetensors file (shared between tools)."""
    from safetensors.torch import load_file

    t = load_file(str(path)).get("calib")
    if t is None or t.dim() != 2:
        raise ModelpressError(f"{path}: expected a 2-D 'calib' tensor of token ids")
    if t.shape[0] < n_samples or t.shape[1] < seq_len:
        raise ModelpressError(f"{path}: holds {tuple(t.shape)} tokens, fewer than {n_samples} x {seq_len} asked")
    return t[:n_samples, :seq_len].long()
