"""Calibration data: N samples x L tokens drawn (seeded) from a text, JSONL or HF dataset source."""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

from ..core.errors import ModelpressError


def read_calibration_texts(source: str | Path, text_field: str = "text", max_docs: int | None = None) -> list[str]:
    """Documents from a plain text file (one document) or JSONL (one ``text_field`` per line).

    ``hf:<dataset>[:<config>][:<split>]`` reads a Hugging Face dataset (needs ``datasets`` and a hub).
    """
    s = str(source)
    if s.startswith("hf:"):
        return _hf_texts(s[3:], text_field, max_docs)
    p = Path(s)
    if not p.is_file():
        raise ModelpressError(f"calibration file not found: {p}")
    if p.suffix in (".jsonl", ".json"):
        return _jsonl_texts(p, text_field, max_docs)
    return [p.read_text(encoding="utf-8", errors="replace")]


def _jsonl_texts(p: Path, field: str, max_docs: int | None) -> list[str]:
    out = []
    with open(p, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ModelpressError(f"{p}:{i}: invalid JSON ({e.msg})") from None
            if field not in rec:
                raise ModelpressError(f"{p}:{i}: no {field!r} field (keys: {', '.join(rec)[:80]})")
            out.append(rec[field])
            if max_docs and len(out) >= max_docs:
                break
    return out


def _hf_texts(spec: str, field: str, max_docs: int | None) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise ModelpressError("hf: calibration sources need `pip install 'modelpress[datasets]'`") from None
    parts = spec.split(":")
    name, cfg, split = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None), (parts[2] if len(parts) > 2 else "train")
    ds = datasets.load_dataset(name, cfg, split=split, streaming=True)
    out = []
    for rec in ds:
        out.append(rec[field])
        if len(out) >= (max_docs or 5000):
            break
    return out


def sample_windows(ids: torch.Tensor, n_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``n_samples`` random windows of ``seq_len`` tokens from a 1-D id stream (GPTQ's sampler)."""
    if ids.numel() < seq_len + 1:
        raise ModelpressError(f"calibration text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seq_len - 1) for _ in range(n_samples)]
    return torch.stack([ids[s:s + seq_len] for s in starts])


def calibration_tokens(tokenizer: Any, source: str | Path, n_samples: int = 128, seq_len: int = 2048,
                       seed: int = 0, text_field: str = "text", bos_token_id: int | None = None,
                       chat: bool = False) -> torch.Tensor:
    """(n_samples, seq_len) token ids for calibration.

    Documents are tokenised, joined and cut into windows; too little text is an error that says how
    much there is, rather than silently repeating tokens. ``chat`` wraps each document as a user
    turn with the tokenizer's chat template.
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
        raise ModelpressError(f"calibration source {source} has {t.numel()} tokens; {n_samples} x {seq_len} "
                              f"= {n_samples * seq_len} asked (lower --calib-samples / --calib-seq-len)")
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
