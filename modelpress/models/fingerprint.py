"""What a model *is*, by content: a checkpoint or a manifest must not trust a path.

A file replaced by another model at the same path gets another digest, so a resumed run never
splices blocks of two models together. Files up to :data:`FULL_HASH_LIMIT` are hashed whole;
larger ones by size, modification time and evenly spaced samples (hashing 100 GB on every resume
would cost minutes; a different model of the same size and mtime is not a realistic accident).
"""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import torch

if TYPE_CHECKING:
    from .loading import LoadedModel

FULL_HASH_LIMIT = 1 << 30  # 1 GiB
_SAMPLES, _SAMPLE_BYTES = 64, 1 << 20


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file (``sampled:``-prefixed digest above :data:`FULL_HASH_LIMIT`).

    Example:
        >>> file_digest("model.safetensors")  # doctest: +SKIP
        '9f2c...'
    """
    st = Path(path).stat()
    return _digest(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= FULL_HASH_LIMIT:
            while chunk := f.read(1 << 20):
                h.update(chunk)
            return h.hexdigest()
        h.update(f"{size}:{mtime_ns}".encode())
        for k in range(_SAMPLES):
            f.seek((size - _SAMPLE_BYTES) * k // (_SAMPLES - 1))
            h.update(f.read(_SAMPLE_BYTES))
    return "sampled:" + h.hexdigest()


def files_digest(files: Iterable[Path]) -> str:
    """One digest over several files (name and content of each, in the given order)."""
    h = hashlib.sha256()
    for f in files:
        h.update(Path(f).name.encode() + b"\0" + file_digest(f).encode() + b"\0")
    return h.hexdigest()


def tensors_digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over named tensors' dtypes, shapes and bytes (an in-memory model has no files)."""
    h = hashlib.sha256()
    for name, t in tensors:
        if t.is_meta:
            continue
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def source_digest(lm: "LoadedModel") -> str:
    """Content identity of the model ``lm`` was loaded from.

    Files: their sha256; a hub download: the hub id at its commit; an in-memory module: its
    current tensors.
    """
    if lm.files:
        return files_digest(lm.files)
    if lm.revision:
        return f"hub:{lm.source}@{lm.revision}"
    return tensors_digest(lm.module.state_dict().items())
