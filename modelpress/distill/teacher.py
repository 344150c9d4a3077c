"""Running teacher and student for the losses, and the teacher's top-k logits cached on disk.

A cached teacher pays its forward pass once: for every training sequence its ``k`` largest logits
and their vocabulary indices (DistillKit's sparse form) go to a safetensors file in the run's
folder, memory-mapped while training, reused by a resumed run when its signature matches.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..core.outputs import save_safetensors
from .losses import Batch, Outputs


def model_outputs(model: nn.Module, batch: Batch, want: dict[str, bool]) -> Outputs:
    """What the losses need from ``model`` on ``batch``: logits of a language model, the hidden states
    (embeddings first) and attention maps when asked, the last hidden states of an encoder."""
    kw: dict[str, Any] = {"input_ids": batch.input_ids}
    if batch.attention_mask is not None:
        kw["attention_mask"] = batch.attention_mask
    hidden = want.get("hidden_states", False)
    out = model(**kw, output_hidden_states=hidden or None, output_attentions=want.get("attentions") or None)
    logits = getattr(out, "logits", None)
    states = getattr(out, "hidden_states", None)
    if states is None and getattr(out, "last_hidden_state", None) is not None:
        states = (out.last_hidden_state,)  # an encoder asked for nothing else: its output is what is compared
    return Outputs(logits=logits, hidden_states=tuple(states) if states is not None else None,
                   attentions=tuple(out.attentions) if getattr(out, "attentions", None) is not None else None)


class TopKCache:
    """The teacher's top-k logits (N, L, k) and indices for every training sequence, on disk."""

    FILE = "teacher-topk.safetensors"

    def __init__(self, values: torch.Tensor, indices: torch.Tensor) -> None:
        self.values, self.indices = values, indices  # (N, L, k) float32, int32

    @classmethod
    def build(cls, teacher: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None, k: int, folder: Path | None,
              signature: dict[str, Any], batch: int = 8) -> "TopKCache":
        """Load the cache from ``folder`` when its signature matches, else run the teacher once and write it."""
        sig = hashlib.sha256(json.dumps(signature, sort_keys=True, default=str).encode()).hexdigest()[:16]
        path = folder / cls.FILE if folder is not None else None
        if path is not None and path.exists():
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                if (f.metadata() or {}).get("signature") == sig:
                    return cls(f.get_tensor("values"), f.get_tensor("indices"))
        vals, idx = [], []
        with torch.no_grad():
            for s in range(0, ids.shape[0], batch):
                b = Batch(ids[s:s + batch], mask[s:s + batch] if mask is not None else None)
                v, i = model_outputs(teacher, b, {}).logits.float().topk(k, dim=-1)
                vals.append(v)
                idx.append(i.to(torch.int32))
        cache = cls(torch.cat(vals), torch.cat(idx))
        if path is not None:
            save_safetensors({"values": cache.values, "indices": cache.indices}, path, metadata={"signature": sig})
        return cache

    def outputs(self, index: torch.Tensor) -> Outputs:
        """The cached teacher outputs of the sequences ``index``."""
        return Outputs(topk_values=self.values[index], topk_indices=self.indices[index].long())
