"""Running 2:4 weights: NVIDIA sparse tensor cores on CUDA, an honest dense fallback elsewhere.

On a CUDA GPU with sparse tensor cores (compute capability 8.0 or newer: A100, H100 ...), the
weights of 2:4 :class:`SparseLayer` linears are converted with
``torch.sparse.to_sparse_semi_structured`` (fp16 / bf16, shapes as the backend requires) and the
layer's matmul goes through cuSPARSELt / CUTLASS. On any other device the layers stay dense and a
warning says so: on CPU the only benefit of pruning is the smaller file (bitmask storage), not speed.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from ..models.layers import set_submodule
from .layer import SparseLayer
from .patterns import NM


@dataclass
class SemiStructuredReport:
    """What :func:`accelerate_2of4` did: layers converted, layers left dense and why."""

    accelerated: list[str] = field(default_factory=list)
    dense: dict[str, str] = field(default_factory=dict)  # layer -> reason
    warnings: list[str] = field(default_factory=list)


def sparse_tensor_cores(device: torch.device) -> str | None:
    """None when ``device`` has 2:4 sparse tensor cores, else the reason it has not."""
    if device.type != "cuda":
        return f"{device.type} has no 2:4 sparse tensor cores"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"compute capability {major}.{minor} < 8.0 has no sparse tensor cores"
    return None


def is_2of4(module: nn.Module) -> bool:
    """A linear-kind SparseLayer whose pattern is 2:4."""
    return isinstance(module, SparseLayer) and module.kind != "conv2d" \
        and isinstance(module.pattern, NM) and (module.pattern.n, module.pattern.m) == (2, 4)


def accelerate_2of4(model: nn.Module, warn: Callable[[str], None] | None = None) -> SemiStructuredReport:
    """Swap the 2:4 sparse linears of ``model`` for semi-structured sparse kernels where the device has them.

    Layers whose device lacks sparse tensor cores, whose dtype is not fp16/bf16 or whose shape the
    backend refuses stay dense (unchanged); every such case is reported and passed to ``warn``
    (e.g. ``ctx.warn``; a Python warning when None), never skipped silently.
    """
    rep = SemiStructuredReport()
    for name, m in [(n, m) for n, m in model.named_modules() if is_2of4(m)]:
        reason = sparse_tensor_cores(m.weight.device)
        if reason is None and m.weight.dtype not in (torch.float16, torch.bfloat16):
            reason = f"dtype {m.weight.dtype} (semi-structured kernels take float16 / bfloat16)"
        if reason is None:
            reason = _convert(model, name, m)
        if reason is None:
            rep.accelerated.append(name)
        else:
            rep.dense[name] = reason
    if rep.dense:
        reasons = sorted(set(rep.dense.values()))
        msg = (f"2:4 acceleration unavailable for {len(rep.dense)} layer(s) ({'; '.join(reasons)}): "
               "they run with the dense kernel; the saving is memory/file size only")
        rep.warnings.append(msg)
        if warn is not None:
            warn(msg)
        else:
            warnings.warn(msg, stacklevel=2)
    return rep


def _convert(model: nn.Module, name: str, m: SparseLayer) -> str | None:
    """Replace ``m`` by an nn.Linear with a semi-structured weight; the reason on failure."""
    from torch.sparse import to_sparse_semi_structured

    dense = m.to_dense()
    if not isinstance(dense, nn.Linear):  # HF Conv1D: its matmul reads (in, out); use a Linear
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None).to(m.weight)
        with torch.no_grad():
            lin.weight.copy_(m.effective_weight())
            if m.bias is not None:
                lin.bias.copy_(m.bias)
        dense = lin
    try:
        dense.weight = nn.Parameter(to_sparse_semi_structured(dense.weight.detach()), requires_grad=False)
    except (RuntimeError, ValueError) as e:
        return f"backend refused shape {tuple(m.weight.shape)}: {str(e).splitlines()[0]}"
    set_submodule(model, name, dense)
    return None
