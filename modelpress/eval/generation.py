"""Greedy generation and the exact-match scorer for generation tasks.

Greedy decoding runs one prompt at a time (no padding, so a compressed model and its baseline see
exactly the same inputs) and stops at EOS, at ``max_new_tokens``, or once the decoded text holds a
stop string (the harness's ``until``), which is cut off. Exact match compares answers after the
SQuAD normalisation: lower case, punctuation and the articles a/an/the removed, whitespace collapsed.

Example:
    >>> text = greedy_text(model, tok, "Q: 2 + 2?\\nA:", max_new_tokens=8, until=("\\n",))  # doctest: +SKIP
    >>> exact_match("The Answer.", ["answer"])
    True
"""
from __future__ import annotations

import inspect
import re
import string
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn

from .perplexity import logits_of
from .tasks import GenerationItem

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def exact_match(prediction: str, answers: Iterable[str]) -> bool:
    """Whether the normalised prediction equals any normalised reference answer."""
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(a) for a in answers)


def eos_ids(model: nn.Module, tok: Any) -> set[int]:
    """End-of-sequence ids from the model's generation config and the tokenizer."""
    ids: set[int] = set()
    for v in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
              getattr(getattr(tok, "tok", tok), "eos_token_id", None)):
        ids |= set(v if isinstance(v, list) else [v] if v is not None else [])
    return ids


@torch.no_grad()
def greedy_ids(model: nn.Module, prompt: list[int], max_new_tokens: int, stop_ids: set[int] = frozenset(),
               done: Any = None) -> list[int]:
    """Greedily generated ids after ``prompt``; ``done(ids)`` may stop early (stop strings).

    Hugging Face models decode with their KV cache; other modules recompute the whole sequence.
    """
    device = next(iter(model.parameters())).device
    x = torch.tensor([prompt], device=device)  # (1, P)
    hf = hasattr(model, "generation_config")
    # transformers 5.x renamed past_key_values to cache (in and out); older releases know only the first
    key = "cache" if hf and "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    past, out = None, []
    for _ in range(max_new_tokens):
        if hf:
            res = model(input_ids=x if past is None else x[:, -1:], use_cache=True, **{key: past})
            past, logits = getattr(res, key), res.logits
        else:
            logits = logits_of(model, x)
        nxt = int(logits[0, -1].float().argmax())
        if nxt in stop_ids:
            break
        out.append(nxt)
        x = torch.cat([x, torch.tensor([[nxt]], device=device)], dim=1)
        if done is not None and done(out):
            break
    return out


def cut_at(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first stop string."""
    ends = [text.find(u) for u in until if u in text]
    return text[: min(ends)] if ends else text


def greedy_text(model: nn.Module, tok: Any, prompt: str, *, max_new_tokens: int = 32, until: Sequence[str] = (),
                bos: int | None = None) -> str:
    """The greedy continuation of ``prompt`` as text, cut at the first stop string."""
    ids = ([bos] if bos is not None else []) + list(tok.encode(prompt))
    done = (lambda new: any(u in tok.decode(new) for u in until)) if until else None
    new = greedy_ids(model, ids, max_new_tokens, eos_ids(model, tok), done)
    return cut_at(tok.decode(new), until)


def score_generation(model: nn.Module, tok: Any, items: Sequence[GenerationItem], *, bos: int | None = None,
                     progress: Any = None) -> list[tuple[str, bool]]:
    """(generated text, exact match) of each item."""
    out = []
    for it in (progress(items, "generating") if progress else items):
        text = greedy_text(model, tok, it.prompt, max_new_tokens=it.max_new_tokens, until=it.until, bos=bos)
        out.append((text, exact_match(text, it.answers)))
    return out
