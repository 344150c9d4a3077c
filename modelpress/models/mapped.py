"""Tensors read straight from a safetensors file's pages (copy-on-write), for low-memory runs.

``safe_open(...).get_tensor`` copies a tensor into RAM. A tensor mapped from the file instead
costs RAM only for the pages that are touched: an embedding table read by a few thousand
calibration tokens stays almost entirely on disk. Writes go to private copies of the pages
(``MAP_PRIVATE``), never to the file. :func:`release` drops a mapped tensor's pages from the
process again once a full read (a finiteness check) is done.
"""
from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path
from typing import Callable

import torch

from ..core.errors import ModelpressError

#: safetensors dtype tags -> torch dtypes
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}

#: Linux's MADV_PAGEOUT (5.4+; Python's mmap module does not name it): reclaim the pages now,
#: clean file pages dropped, privately written ones kept (swapped if anything)
MADV_PAGEOUT = 21

#: every mapping made here, so their pages can be handed back after a full pass (:func:`page_out`)
_ALL: list[mmap.mmap] = []
#: data pointers of mapped tensors already checked finite (their pages were read once at load)
_CHECKED: set[int] = set()


def header(path: Path) -> tuple[int, dict]:
    """(byte offset of the data section, the JSON header) of a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return 8 + n, json.loads(f.read(n))


def map_tensors(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """``names`` from one safetensors file as tensors over private (copy-on-write) mappings of it.

    Each floating-point tensor is checked finite as it is mapped (the one full read it gets), and
    its pages are then dropped from RAM again: nothing has written to them yet, so they are clean
    and are read back from the file on next use.
    """
    start, meta = header(path)
    out = {}
    with open(path, "rb") as f:
        for name in names:
            info = meta[name]
            if info["dtype"] not in _DTYPES:
                raise ModelpressError(f"{path}: tensor {name} has dtype {info['dtype']}, which cannot be mapped")
            dtype = _DTYPES[info["dtype"]]
            a, b = info["data_offsets"]
            if b == a:
                out[name] = torch.empty(info["shape"], dtype=dtype)
                continue
            off = (start + a) // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
            mm = mmap.mmap(f.fileno(), start + b - off, flags=mmap.MAP_PRIVATE,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=off)
            t = torch.frombuffer(mm, dtype=torch.uint8, offset=start + a - off, count=b - a)
            t = t.view(dtype).view(info["shape"])
            if t.is_floating_point():
                _check_finite(path, name, t)
                _CHECKED.add(t.untyped_storage().data_ptr())
            if hasattr(mm, "madvise"):
                mm.madvise(mmap.MADV_DONTNEED)  # clean pages only (nothing wrote yet): the file still holds them
            _ALL.append(mm)
            out[name] = t
    return out


def checked_at_load(t: torch.Tensor) -> bool:
    """Whether ``t`` is a mapped tensor already checked finite when it was mapped."""
    return t.untyped_storage().data_ptr() in _CHECKED


def _check_finite(path: Path, name: str, t: torch.Tensor, rows: int = 4096) -> None:
    """Finite check in slices (a whole-tensor ``isfinite`` would allocate a bool copy of it)."""
    flat = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(-1, 1)
    for s in range(0, flat.shape[0], rows):
        if not torch.isfinite(flat[s:s + rows]).all():
            raise ModelpressError(f"{path}: tensor {name} holds NaN/Inf values; refusing to use it")


def page_out() -> None:
    """Hand back the pages of every mapped tensor read so far (e.g. the embedding rows of a
    calibration pass); written pages are kept, so this is safe at any time."""
    for mm in _ALL:
        try:
            mm.madvise(MADV_PAGEOUT)
        except (OSError, ValueError, AttributeError):  # older kernel, closed mapping: nothing to hand back
            pass


_ST_DTYPES = {v: k for k, v in _DTYPES.items()}


def save_by_rows(path: Path, tensors: dict[str, torch.Tensor], rows: int,
                 done: Callable[[str, int, int], None] | None = None) -> None:
    """Write ``tensors`` as one safetensors file, ``rows`` leading-dimension rows at a time.

    ``safetensors.torch.save_file`` serialises every tensor into one buffer first, which for a
    memory-mapped activation cache means reading all of it into RAM; here each slice is written
    from its own pages and ``done(name, start, stop)`` may release them right after.
    """
    head, off = {}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        head[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, t in tensors.items():
            for a in range(0, max(t.shape[0], 1) if t.dim() else 1, rows):
                part = t[a:a + rows] if t.dim() else t
                f.write(part.contiguous().reshape(-1).view(torch.uint8).numpy().data)
                if done is not None and t.dim():
                    done(name, a, min(a + rows, t.shape[0]))
