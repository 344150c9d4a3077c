"""Log-likelihood multiple-choice scoring, split and summed the way lm-evaluation-harness does it.

For a context ``c`` and a choice ``x`` the continuation is ``" " + x`` (the harness's target
delimiter). The harness's ``_encode_pair`` then moves trailing spaces of the context onto the
continuation, encodes ``context`` and ``context + continuation`` and takes the continuation's tokens
as ``whole[len(context_ids):]``; an empty context is replaced by one prefix token (BOS, else EOS,
as ``HFLM.prefix_token_id``). The model reads ``(context + continuation)[-(max_len + 1):][:-1]`` and
the continuation's log-likelihood is the sum of its tokens' log-probabilities.

    acc      = [argmax_i  ll_i == label]
    acc_norm = [argmax_i  ll_i / bytes(choice_i) == label]

``bytes(choice_i)`` is the UTF-8 length of the choice as written (no leading space). The harness's
``acc_norm`` divides by ``len(choice)`` in characters, which is the same number for ASCII choices
(HellaSwag, BLiMP); for other text ours is its ``acc_bytes``.

All (item, choice) requests are sorted by length and scored in right-padded batches (causal
attention makes right padding exact), then put back in order.

Example:
    >>> scores = score_choices(model, tok, task.items)   # doctest: +SKIP
    >>> choice_metrics(task.items, scores)["acc"]         # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.errors import ModelpressError
from .perplexity import logits_of
from .tasks import ChoiceItem

#: The harness's ``target_delimiter``: placed between context and choice.
DELIMITER = " "


@dataclass(frozen=True)
class ChoiceScores:
    """Per-choice log-likelihoods of one item and the predictions they give."""

    loglik: tuple[float, ...]  # sum of the continuation's token log-probs, per choice
    greedy: tuple[bool, ...]  # whether every continuation token was the argmax (harness is_greedy)
    n_tokens: tuple[int, ...]  # continuation tokens per choice
    pred: int  # argmax of loglik
    pred_norm: int  # argmax of loglik / bytes(choice)


def prefix_token_id(tok: Any) -> int:
    """The token an empty context is replaced by: BOS, else EOS (the harness's ``prefix_token_id``)."""
    for attr in ("bos_token_id", "eos_token_id"):
        for obj in (tok, getattr(tok, "tok", None)):
            v = getattr(obj, attr, None) if obj is not None else None
            if v is not None:
                return int(v)
    raise ModelpressError("the tokenizer has neither a BOS nor an EOS token, so an empty context cannot be scored")


def encode_pair(tok: Any, context: str, continuation: str, bos: int | None = None) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) split as the harness's ``TemplateLM._encode_pair`` does.

    ``bos``: prepended to the context (models trained with BOS at every sequence start).
    """
    if context == "":
        return [prefix_token_id(tok) if bos is None else bos], list(tok.encode(continuation))
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = list(tok.encode(context + continuation))
    ctx = list(tok.encode(context))
    head = [bos] if bos is not None else []
    return head + ctx, whole[len(ctx):]


def _argmax(values: Sequence[float]) -> int:
    """First index of the maximum (numpy's argmax tie rule)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


@torch.no_grad()
def score_requests(model: nn.Module, requests: Sequence[tuple[list[int], list[int]]], max_len: int,
                   token_budget: int = 1024, progress: Callable[[Iterable, str], Iterable] | None = None,
                   pad_id: int = 0) -> list[tuple[float, bool]]:
    """(sum of log-probs, is_greedy) of each (context ids, continuation ids) request, batched."""
    for ctx, cont in requests:
        if not cont:
            raise ModelpressError("a continuation encodes to no tokens; it cannot be scored")
    rows = [(ctx + cont)[-(max_len + 1):][:-1] for ctx, cont in requests]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    batches = list(_batches(order, [len(r) for r in rows], token_budget))
    device = _device(model)
    for batch in (progress(batches, "scoring") if progress else batches):
        width = len(rows[batch[0]])
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T), right-padded
        for b, i in enumerate(batch):
            ids[b, : len(rows[i])] = torch.tensor(rows[i])
        logits = logits_of(model, ids.to(device))  # (B, T, V)
        for b, i in enumerate(batch):
            n, cont = len(rows[i]), requests[i][1]
            lp = F.log_softmax(logits[b, n - len(cont): n].float(), dim=-1)  # (len(cont), V)
            target = torch.tensor(cont, device=lp.device)
            out[i] = (float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
    return out


def _batches(order: list[int], lengths: list[int], budget: int) -> Iterable[list[int]]:
    """Consecutive requests (longest first) while rows x longest row stays within ``budget`` tokens."""
    batch: list[int] = []
    for i in order:
        if batch and (len(batch) + 1) * lengths[batch[0]] > budget:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def _device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def score_choices(model: nn.Module, tok: Any, items: Sequence[ChoiceItem], *, max_len: int = 2048,
                  bos: int | None = None, token_budget: int = 1024,
                  progress: Callable[[Iterable, str], Iterable] | None = None) -> list[ChoiceScores]:
    """Score every choice of every item (all requests batched) and pick each item's answers."""
    requests, spans = [], []
    for it in items:
        spans.append((len(requests), len(it.choices)))
        requests += [encode_pair(tok, it.context, DELIMITER + c, bos) for c in it.choices]
    res = score_requests(model, requests, max_len, token_budget, progress)
    out = []
    for it, (start, n) in zip(items, spans):
        ll = tuple(res[start + j][0] for j in range(n))
        norm = [v / len(c.encode("utf-8")) for v, c in zip(ll, it.choices)]
        out.append(ChoiceScores(ll, tuple(res[start + j][1] for j in range(n)),
                                tuple(len(requests[start + j][1]) for j in range(n)), _argmax(ll), _argmax(norm)))
    return out


def choice_metrics(items: Sequence[ChoiceItem], scores: Sequence[ChoiceScores]) -> dict[str, Any]:
    """``acc``, ``acc_norm`` (means over items) and ``n``."""
    n = len(items)
    acc = sum(s.pred == it.label for it, s in zip(items, scores)) / n
    acc_norm = sum(s.pred_norm == it.label for it, s in zip(items, scores)) / n
    return {"acc": acc, "acc_norm": acc_norm, "n": n}
