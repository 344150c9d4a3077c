"""Model size: logical parameter count, bytes in memory, bytes on disk."""
from __future__ import annotations

import os
import resource
from pathlib import Path

import torch.nn as nn

from ..quant.qlinear import QuantLinear


def count_params(model: nn.Module) -> int:
    """Logical parameters: a quantised (out, in) weight counts out*in, tied tensors once."""
    seen, total = set(), 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += m.out_features * m.in_features
        for p in m.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def memory_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and persistent buffers (tied tensors once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def disk_bytes(path: str | os.PathLike | None) -> int | None:
    """Bytes of a file, or of the weight files in a folder (None when there is nothing on disk)."""
    if path is None:
        return None
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    if p.is_dir():
        files = [f for f in p.iterdir() if f.suffix in (".safetensors", ".bin", ".gguf", ".pt")]
        return sum(f.stat().st_size for f in files) or None
    return None


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
