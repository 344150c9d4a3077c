"""Teacher-generated training text: sample from a causal LM, drop duplicates and what the teacher
itself finds unlikely, and store the rest as a JSONL file that ``--train`` reads.

The steps, each a small function:

1. prompts: the lines of a file (JSONL: each row's ``prompt`` or ``text``), or the first
   ``prompt_tokens`` tokens of each document of a text source (a source holding one document, a
   plain text file, counts its blank-line separated paragraphs);
2. sampling with the model's own ``generate`` (temperature, top-p, top-k), seeded per batch so
   that the same seed gives the same samples;
3. exact duplicates (hash of the case- and space-normalised text) and near duplicates (Jaccard
   similarity of word shingles at or above ``near_duplicate``; the first one is kept);
4. the teacher's mean log-likelihood per generated token (temperature 1): samples below
   ``min_logprob``, and the least likely ``drop_fraction``, are dropped;
5. ``FILE.jsonl`` rows ``{"text", "prompt", "teacher_logprob"}`` and the sidecar ``FILE.export.json``
   (teacher, settings, counts, seed), written atomically.

Example:
    >>> cfg = GenerateConfig(from_docs="bundled:c4", samples=256, max_new_tokens=128, seed=0)
    >>> report = generate_dataset(lm, cfg, "gen.jsonl")      # doctest: +SKIP
    >>> report.counts                                        # doctest: +SKIP
    {'generated': 256, 'empty': 0, 'exact_duplicate': 2, 'near_duplicate': 5, 'unlikely': 0, 'kept': 249}
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, model_validator

from ..core.config import Config
from ..core.errors import ModelpressError
from ..core.outputs import atomic_output, export_sidecar, writing
from ..models.loading import LoadedModel
from .losses import Batch

#: The sidecar's ``format``: it marks the JSONL as modelpress's own, so ``--overwrite`` may replace it
#: (``core.outputs.SIDECAR_FORMATS`` lists it).
FORMAT = "generated-text"


class GenerateConfig(Config):
    """What to sample and what to keep (see the module docstring).

    ``prompts`` (a file) or ``from_docs`` (a text source); inside a ``distill`` stage both may be left
    out and the stage's training text gives the document starts. ``samples`` sequences are drawn in
    all, the prompts taken in turn (cycled when there are fewer prompts than samples).
    """

    prompts: str | None = None
    from_docs: str | None = None
    prompt_tokens: int = Field(16, ge=1, description="tokens of each document's start used as its prompt")
    samples: int = Field(64, ge=1)
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0: no top-k cut")
    seed: int = Field(0, ge=0)
    batch_size: int = Field(8, ge=1)
    near_duplicate: float = Field(0.8, gt=0, le=1, description="word-shingle Jaccard from which a sample is a "
                                                               "near duplicate")
    shingle: int = Field(3, ge=1, description="words per shingle")
    min_logprob: float | None = Field(None, le=0, description="drop samples whose mean teacher log-prob is lower")
    drop_fraction: float = Field(0.0, ge=0, lt=1, description="drop this fraction of the least likely samples")

    @model_validator(mode="after")
    def _one_prompt_source(self) -> "GenerateConfig":
        if self.prompts is not None and self.from_docs is not None:
            raise ValueError("give prompts (a file) or from_docs (a text source), not both")
        return self


@dataclass
class Sample:
    """One generated sequence: its prompt, the prompt's ids (BOS first when the model uses one) and
    the generated ids, cut before the first end-of-sequence token."""

    prompt: str
    prompt_ids: list[int]
    new_ids: list[int]
    text: str = ""


@dataclass
class GenerationReport:
    """What :func:`generate_dataset` wrote and why samples were dropped."""

    path: Path
    counts: dict[str, int]
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "counts": self.counts, "seconds": self.seconds, "settings": self.settings}


# ---- prompts -------------------------------------------------------------------------------------
def load_prompts(lm: LoadedModel, cfg: GenerateConfig) -> list[tuple[str, list[int]]]:
    """(prompt text, its token ids without BOS) from ``cfg.prompts`` or ``cfg.from_docs``."""
    tok = _tokenizer(lm)
    if cfg.prompts is not None:
        out = [(p, tok.encode(p)) for p in read_prompt_file(cfg.prompts)]
    elif cfg.from_docs is not None:
        starts = document_starts(lm, cfg.from_docs, cfg.prompt_tokens, cfg.samples)
        out = [(tok.decode(ids).strip(), ids) for ids in starts]
    else:
        raise ModelpressError("generate needs prompts: a prompts file, or a text source (from_docs) whose "
                              "documents start them")
    out = [(text, ids) for text, ids in out if ids]
    if not out:
        raise ModelpressError(f"no prompts in {cfg.prompts or cfg.from_docs}")
    return out


def read_prompt_file(path: str | Path) -> list[str]:
    """Non-empty lines of a text file, or each JSONL row's ``prompt`` (else ``text``) field."""
    from ..data.sources import read_documents, read_text

    p = Path(path)
    if not p.name.removesuffix(".gz").endswith((".jsonl", ".json")):
        return [ln.strip() for ln in read_text(p, join_lines=False).splitlines() if ln.strip()]
    try:
        rows = read_documents(p, "prompt")
    except ModelpressError as e:
        if "no 'prompt' field" not in str(e):
            raise
        rows = read_documents(p, "text")
    return [r.strip() for r in rows if r.strip()]


def document_starts(lm: LoadedModel, source: str | Path, n_tokens: int, max_docs: int) -> list[list[int]]:
    """The first ``n_tokens`` token ids of up to ``max_docs`` documents of ``source``."""
    from ..data.sources import read_documents

    docs = [d for d in read_documents(source, max_docs=max_docs) if d.strip()]
    if len(docs) == 1:  # one document (a plain text file): its paragraphs start the prompts
        docs = [p for p in re.split(r"\n\s*\n", docs[0]) if p.strip()][:max_docs]
    tok = _tokenizer(lm)
    # a token is rarely longer than 32 characters: encoding a prefix is enough for the first tokens
    return [tok.encode(d.strip()[:32 * n_tokens + 64])[:n_tokens] for d in docs]


def _tokenizer(lm: LoadedModel) -> Any:
    if lm.tokenizer is None:
        raise ModelpressError("generating text needs a tokenizer, and this model has none")
    return lm.tokenizer


# ---- sampling ------------------------------------------------------------------------------------
def sample(lm: LoadedModel, cfg: GenerateConfig, prompts: list[tuple[str, list[int]]]) -> list[Sample]:
    """``cfg.samples`` sequences from the model, prompts taken in turn; deterministic given the seed
    (and the batch size: batch ``b`` draws from the generator seeded with ``(seed, b)``)."""
    model, tok = lm.module, _tokenizer(lm)
    bos = [tok.bos_token_id] if lm.add_bos and tok.bos_token_id is not None else []
    room = (lm.max_length or 1 << 30) - cfg.max_new_tokens - len(bos)
    if room < 1:
        raise ModelpressError(f"max_new_tokens {cfg.max_new_tokens} leaves no room for a prompt within the "
                              f"model's maximum length {lm.max_length}")
    chosen = [prompts[i % len(prompts)] for i in range(cfg.samples)]
    eos, pad = _special_ids(model)
    out: list[Sample] = []
    for b, start in enumerate(range(0, len(chosen), cfg.batch_size)):
        batch = [(text, bos + ids[-room:]) for text, ids in chosen[start:start + cfg.batch_size]]
        new = _generate(model, [ids for _, ids in batch], cfg, pad, seed=cfg.seed * 1_000_003 + b)
        for (text, ids), gen in zip(batch, new):
            gen = _cut(gen, eos)
            out.append(Sample(text, ids, gen, tok.decode(ids + gen).strip()))
    return out


def _generate(model: nn.Module, prompts: list[list[int]], cfg: GenerateConfig, pad: int, seed: int) -> list[list[int]]:
    """Generated ids of each prompt (left-padded into one batch), sampled from a seeded generator."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)  # (B, P)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        seqs = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=cfg.temperature,
                              top_p=cfg.top_p, top_k=cfg.top_k, max_new_tokens=cfg.max_new_tokens,
                              pad_token_id=pad)  # (B, P + new)
    return seqs[:, width:].tolist()


def _special_ids(model: nn.Module) -> tuple[set[int], int]:
    """End-of-sequence ids and the padding id the model's generation config names."""
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None)
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    pad = getattr(gc, "pad_token_id", None)
    return eos_ids, pad if pad is not None else min(eos_ids, default=0)


def _cut(ids: list[int], eos: set[int]) -> list[int]:
    return next((ids[:i] for i, t in enumerate(ids) if t in eos), ids)


# ---- on-policy: the student generates, the teacher scores (GKD) ----------------------------------
class OnPolicyConfig(Config):
    """GKD's on-policy mode (Agarwal et al. 2024): a ``fraction`` of the batches are replaced by the
    student's own continuations of their first ``prompt_tokens`` tokens; the loss (with the teacher
    run on those sequences) then covers the generated tokens only."""

    fraction: float = Field(0.5, ge=0, le=1, description="share of batches the student generates (GKD's lambda)")
    prompt_tokens: int = Field(8, ge=1)
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)


def on_policy_batch(student: nn.Module, batch: Batch, cfg: OnPolicyConfig, seed: int) -> Batch:
    """The student's continuations of the batch's first tokens (sampled from a generator seeded with
    ``seed``), with labels on the generated tokens only (the first end-of-sequence token included)."""
    k = min(cfg.prompt_tokens, int(batch.mask().sum(1).min()))  # a common prompt length: no padding
    eos, pad = _special_ids(student)
    was_training = student.training
    student.eval()
    gen = GenerateConfig(samples=1, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
    new = torch.tensor(_generate(student, batch.input_ids[:, :k].tolist(), gen, pad, seed),
                       device=batch.input_ids.device)  # (B, new)
    student.train(was_training)
    ids = torch.cat([batch.input_ids[:, :k], new], dim=1)  # (B, k + new)
    ended = torch.isin(new, torch.tensor(sorted(eos), dtype=new.dtype, device=new.device))
    after_eos = (ended.cumsum(1) - ended.long()) > 0  # (B, new): past the first end-of-sequence token
    mask = torch.cat([torch.ones_like(ids[:, :k]), (~after_eos).long()], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, k - 1:-1] = new.masked_fill(after_eos, -100)  # position t predicts token t + 1
    return Batch(ids, mask, labels, batch.extra)


# ---- duplicates ----------------------------------------------------------------------------------
def normalized(text: str) -> str:
    """Lower case, whitespace runs as one space: what an exact duplicate must match."""
    return " ".join(text.lower().split())


def shingles(text: str, k: int) -> frozenset[tuple[str, ...]]:
    """The set of ``k`` consecutive words of the normalised text (the whole text when shorter)."""
    words = normalized(text).split()
    return frozenset(tuple(words[i:i + k]) for i in range(max(1, len(words) - k + 1)))


def jaccard(a: frozenset, b: frozenset) -> float:
    """``|a & b| / |a | b|`` (1 for two empty sets)."""
    return len(a & b) / len(a | b) if a or b else 1.0


def deduplicate(texts: list[str], threshold: float = 0.8, k: int = 3) -> tuple[list[int], dict[str, int]]:
    """Indices of the texts to keep (first of each group) and how many were exact / near duplicates.

    A text is a near duplicate when its shingle Jaccard with an earlier kept text is ``>= threshold``.
    Candidates come from an inverted index (a pair with no shingle in common has Jaccard 0) and a
    size bound (``J(a, b) <= min(|a|, |b|) / max(|a|, |b|)``), so most pairs are never compared.
    """
    seen: set[str] = set()
    index: dict[tuple[str, ...], list[int]] = {}
    kept: list[int] = []
    sets: dict[int, frozenset] = {}
    counts = {"exact_duplicate": 0, "near_duplicate": 0}
    for i, text in enumerate(texts):
        h = hashlib.sha256(normalized(text).encode()).hexdigest()
        if h in seen:
            counts["exact_duplicate"] += 1
            continue
        seen.add(h)
        s = shingles(text, k)
        others = {j for sh in s for j in index.get(sh, ())}
        if any(min(len(s), len(sets[j])) >= threshold * max(len(s), len(sets[j])) and jaccard(s, sets[j]) >= threshold
               for j in others):
            counts["near_duplicate"] += 1
            continue
        kept.append(i)
        sets[i] = s
        for sh in s:
            index.setdefault(sh, []).append(i)
    return kept, counts


# ---- the teacher's score -------------------------------------------------------------------------
def teacher_logprobs(model: nn.Module, samples: list[Sample], batch_size: int = 8) -> list[float]:
    """Mean log-probability the model gives each sample's generated tokens (temperature 1)."""
    device = next(model.parameters()).device
    scores: list[float] = []
    for s in range(0, len(samples), batch_size):
        chunk = samples[s:s + batch_size]
        seqs = [c.prompt_ids + c.new_ids for c in chunk]
        width = max(len(q) for q in seqs)
        ids = torch.tensor([q + [0] * (width - len(q)) for q in seqs], device=device)  # (B, T), right-padded
        mask = torch.tensor([[1] * len(q) + [0] * (width - len(q)) for q in seqs], device=device)
        with torch.no_grad():
            logp = F.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)  # (B, T, V)
        tok_lp = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1): log p(token t+1 | ..t)
        for row, c in zip(tok_lp, chunk):
            p, n = len(c.prompt_ids), len(c.new_ids)
            scores.append(float(row[p - 1:p - 1 + n].mean()))
    return scores


def likely(scores: list[float], min_logprob: float | None, drop_fraction: float) -> list[bool]:
    """Which samples to keep: not below ``min_logprob``, and not among the ``drop_fraction`` least likely."""
    keep = [min_logprob is None or v >= min_logprob for v in scores]
    n_drop = int(drop_fraction * len(scores))
    for i in sorted(range(len(scores)), key=lambda i: scores[i])[:n_drop]:
        keep[i] = False
    return keep


# ---- the whole pipeline --------------------------------------------------------------------------
def generate_dataset(lm: LoadedModel, cfg: GenerateConfig, out_path: str | Path, *,
                     overwrite: bool = False) -> GenerationReport:
    """Sample from ``lm``, deduplicate, filter by the teacher's own score, and write ``out_path``
    (``.jsonl``) with its provenance sidecar. Returns the counts of what was dropped and why."""
    out = check_output(out_path)
    t0 = time.perf_counter()
    samples = sample(lm, cfg, load_prompts(lm, cfg))
    counts = {"generated": len(samples)}
    nonempty = [s for s in samples if s.new_ids and s.text]
    counts["empty"] = len(samples) - len(nonempty)
    keep, dup = deduplicate([s.text for s in nonempty], cfg.near_duplicate, cfg.shingle)
    counts.update(dup)
    unique = [nonempty[i] for i in keep]
    scores = teacher_logprobs(lm.module, unique, cfg.batch_size)
    ok = likely(scores, cfg.min_logprob, cfg.drop_fraction)
    rows = [{"text": s.text, "prompt": s.prompt, "teacher_logprob": v} for s, v, k in zip(unique, scores, ok) if k]
    counts["unlikely"] = len(unique) - len(rows)
    counts["kept"] = len(rows)
    if not rows:
        raise ModelpressError(f"generate: every sample was dropped ({_why(counts)}); loosen the filters or sample more")
    report = GenerationReport(out, counts, time.perf_counter() - t0, cfg.to_dict())
    write_dataset(rows, _provenance(lm, cfg, counts), out, overwrite)
    return report


def check_output(path: str | Path) -> Path:
    """The output path, refused unless it is a ``.jsonl`` file (what ``--train`` reads row by row)."""
    out = Path(path)
    if out.suffix != ".jsonl":
        raise ModelpressError(f"generated text is written as JSONL: the output must end in .jsonl, got {out}")
    return out


def _why(counts: dict[str, int]) -> str:
    return ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items() if k not in ("generated", "kept") and v)


def _provenance(lm: LoadedModel, cfg: GenerateConfig, counts: dict[str, int]) -> dict[str, Any]:
    from ..models.fingerprint import source_digest

    return {"format": FORMAT, "teacher": {"source": lm.source, "kind": lm.kind, "revision": lm.revision,
                                          "digest": source_digest(lm)},
            "settings": cfg.to_dict(), "seed": cfg.seed, "counts": counts,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_dataset(rows: list[dict[str, Any]], meta: dict[str, Any], out: Path, overwrite: bool) -> None:
    """``out`` (JSONL, one row per line) and its sidecar, each renamed into place when complete."""
    with atomic_output(out, overwrite, is_file=True) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        side = export_sidecar(out)
        side_tmp = side.parent / f".{side.name}.tmp-{os.getpid()}"
        with writing(side):
            side_tmp.write_text(json.dumps(meta | {"rows": len(rows), "file": out.name}, indent=2))
            os.replace(side_tmp, side)  # the sidecar first: a JSONL in place always has its own

