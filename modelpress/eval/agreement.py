"""Agreement of a compressed model with its baseline: answer flips, next-token KL and top-1 agreement.

Average accuracy hides flips: a compressed model can lose as many right answers as it gains and
keep its score ("Accuracy is Not All You Need", Dutta et al. 2024). So per task we count items
whose predicted answer changed, in either direction, and on a text we compare the two next-token
distributions position by position:

    KL(P_base || P_new) = sum_v P_base(v) (log P_base(v) - log P_new(v))     (nats, mean over positions)
    top-1 agreement     = mean [argmax P_base == argmax P_new]

Windows are the perplexity protocol's non-overlapping windows of ``seq_len`` tokens.

Example:
    >>> flips([0, 1, 2], [0, 2, 2], labels=[0, 1, 2])
    {'flip_rate': 0.3333333333333333, 'flips': 1, 'n': 3, 'correct_to_wrong': 1, 'wrong_to_correct': 0}
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.errors import ModelpressError
from .perplexity import logits_of, windows


def flips(base: Sequence[int], new: Sequence[int], labels: Sequence[int] | None = None) -> dict[str, Any]:
    """Share of items whose answer changed; with labels, how many went right -> wrong and wrong -> right."""
    if len(base) != len(new) or not base:
        raise ModelpressError(f"flip rate needs two equally long, non-empty answer lists (got {len(base)}, {len(new)})")
    changed = sum(a != b for a, b in zip(base, new))
    out: dict[str, Any] = {"flip_rate": changed / len(base), "flips": changed, "n": len(base)}
    if labels is not None:
        out["correct_to_wrong"] = sum(a == y != b for a, b, y in zip(base, new, labels))
        out["wrong_to_correct"] = sum(b == y != a for a, b, y in zip(base, new, labels))
    return out


def kl_top1(base_logits: torch.Tensor, new_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position KL(base || new) in nats and top-1 agreement (0/1) of (positions, vocab) logits."""
    lp_b = F.log_softmax(base_logits.float(), dim=-1)  # (N, V)
    lp_n = F.log_softmax(new_logits.float(), dim=-1)  # (N, V)
    kl = (lp_b.exp() * (lp_b - lp_n)).sum(-1)  # (N,)
    return kl, (lp_b.argmax(-1) == lp_n.argmax(-1)).float()


@torch.no_grad()
def next_token_agreement(model: nn.Module, baseline: nn.Module, ids: Sequence[int] | torch.Tensor, seq_len: int,
                         *, bos_token_id: int | None = None,
                         progress: Callable[[Iterable, str], Iterable] | None = None) -> dict[str, Any]:
    """Mean next-token KL(baseline || model) and top-1 agreement over non-overlapping windows."""
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    body = seq_len - 1 if bos_token_id is not None else seq_len
    wins = windows(ids.numel(), body, body)
    if not wins:
        raise ModelpressError(f"the agreement text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    kl_sum, agree, count, per_window = 0.0, 0.0, 0, []
    for begin, end, _ in (progress(wins, "agreement") if progress else wins):
        x = ids[begin:end]
        if bos_token_id is not None:
            x = torch.cat([torch.tensor([bos_token_id]), x])
        kl, top1 = kl_top1(logits_of(baseline, x[None])[0], logits_of(model, x[None])[0])
        kl_sum, agree, count = kl_sum + float(kl.sum()), agree + float(top1.sum()), count + kl.numel()
        per_window.append(float(kl.mean()))
    return {"kl": kl_sum / count, "top1_agreement": agree / count, "positions": count, "windows": len(wins),
            "seq_len": seq_len, "kl_per_window": per_window}
