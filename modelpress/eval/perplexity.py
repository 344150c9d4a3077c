"""Perplexity with the GPTQ-paper protocol (non-overlapping windows) or a sliding window.

GPTQ protocol: the evaluation text is tokenised once, cut into ``len // L`` non-overlapping windows
of ``L`` tokens (the remainder is dropped) and PPL = exp(mean next-token NLL over all predicted
tokens). With ``stride < L`` windows overlap and only each window's last ``stride`` targets are
scored (the Hugging Face "sliding window" recipe), which gives every token more context.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.errors import ModelpressError


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # tokens of text evaluated (after --max-tokens)
    predicted: int  # tokens whose probability was scored
    seq_len: int
    stride: int
    windows: int
    add_bos: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """(batch, seq, vocab) logits from an HF model or a plain module returning logits."""
    out = model(input_ids=ids) if _takes_input_ids(model) else model(ids)
    return out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, tuple) else out)


def _takes_input_ids(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "generation_config") or hasattr(model, "get_input_embeddings")


def windows(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored index within the window) for each window."""
    if stride >= seq_len:
        return [(i * seq_len, (i + 1) * seq_len, 0) for i in range(n_tokens // seq_len)]
    out, prev_end = [], 0
    for begin in range(0, n_tokens - 1, stride):
        end = min(begin + seq_len, n_tokens)
        out.append((begin, end, max(prev_end - begin, 0)))
        prev_end = end
        if end == n_tokens:
            break
    return out


@torch.no_grad()
def perplexity(
    model: nn.Module,
    ids: list[int] | torch.Tensor,
    seq_len: int,
    *,
    stride: int | None = None,
    bos_token_id: int | None = None,
    progress: Callable[[Iterable, str], Iterable] | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on token ids.

    ``bos_token_id`` (for models trained with BOS at every sequence start, like llama2.c's) puts BOS
    in front of each window of ``seq_len - 1`` text tokens.

    Example:
        >>> perplexity(model, tok.encode(text), 2048).perplexity  # doctest: +SKIP
    """
    if seq_len < 2 or (stride is not None and stride < 1):
        raise ModelpressError(f"perplexity needs windows of >= 2 tokens and a stride >= 1 (got {seq_len}, {stride})")
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    body = seq_len - 1 if bos_token_id is not None else seq_len
    stride = body if stride is None else min(stride, body)
    wins = windows(ids.numel(), body, stride)
    if not wins:
        raise ModelpressError(f"text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    device = next(model.parameters()).device if any(True for _ in model.parameters()) else torch.device("cpu")
    nll_sum, count = 0.0, 0
    it = progress(wins, "perplexity") if progress else wins
    for begin, end, first in it:
        x = ids[begin:end]
        if bos_token_id is not None:
            x = torch.cat([torch.tensor([bos_token_id]), x])
            first = first + 1 if first else 0  # BOS itself is never a target; offset context
        logits = logits_of(model, x[None].to(device))[0].float()  # (seq, vocab)
        targets = x[1:].to(device)
        lp = F.cross_entropy(logits[:-1], targets, reduction="none")  # (seq-1,)
        scored = lp[max(first - 1, 0):] if first else lp
        nll_sum += float(scored.sum())
        count += scored.numel()
    nll = nll_sum / count
    return PerplexityResult(math.exp(nll), nll, int(ids.numel()), count, seq_len, stride, len(wins), bos_token_id is not None)
