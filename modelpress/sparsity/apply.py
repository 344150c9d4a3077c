"""Installing a pruned weight in a model and recording it (shared by every pruning method)."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..models.layers import is_conv1d, set_submodule
from ..core.method import LayerRecord, RunContext
from .layer import SparseLayer, dense_weight
from .patterns import SparsityPattern


@torch.no_grad()
def install_pruned(model: nn.Module, name: str, module: nn.Module, weight: torch.Tensor, mask: torch.Tensor,
                   pattern: SparsityPattern, storage: str = "bitmask") -> nn.Module:
    """Put ``weight * mask`` in place of ``module``'s weight.

    ``weight`` is (out, in) for linear kinds and Conv2d-shaped for convolutions (as
    :func:`dense_weight` gives). ``bitmask`` storage swaps in a :class:`SparseLayer`; ``dense``
    writes the zeros into the original layer (a SparseLayer is turned back into its dense class).
    """
    _, kind, conv = dense_weight(module, name)
    w = weight.masked_fill(~mask.to(weight.device), 0).to(dtype=module.weight.dtype)
    if storage == "bitmask":
        new = SparseLayer(w, mask, getattr(module, "bias", None), kind, conv, pattern)
        set_submodule(model, name, new)
        return new
    if isinstance(module, SparseLayer):
        module = module.to_dense()
        set_submodule(model, name, module)
    module.weight.copy_(w.t() if is_conv1d(module) else w)
    return module


def record_pruned(ctx: RunContext, method: str, name: str, w: torch.Tensor, mask: torch.Tensor,
                  pattern: SparsityPattern, new: torch.Tensor | None = None, storage: str = "bitmask",
                  **extra) -> LayerRecord:
    """Append the per-layer row: pattern, sparsity, stored bits/weight, relative weight change."""
    new = w * mask if new is None else new * mask
    rel = float((w - new).norm() / w.norm().clamp_min(1e-12))
    sparsity = 1.0 - float(mask.float().mean())
    numel = mask.numel()
    rows = mask.shape[0]
    bits = 8.0 * (rows * -(-(numel // rows) // 8) + int(mask.sum()) * w.element_size()) / numel \
        if storage == "bitmask" else 8.0 * w.element_size()
    rec = LayerRecord(name, method, {"pattern": pattern.to_dict(), "sparsity": round(sparsity, 6)},
                      tuple(w.reshape(rows, -1).shape), bits, rel, **extra)
    ctx.layers.append(rec)
    return rec
