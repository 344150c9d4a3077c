"""``SparseLayer``: a Linear / HF Conv1D / Conv2d whose mask is enforced and whose file is compact.

In memory the layer keeps a dense trainable ``weight`` and a bool ``mask``; the forward always uses
``weight * mask``, so zeros stay zeros whatever an optimizer writes into ``weight`` (momentum,
weight decay, a tightened mask with stale Adam state ...), and the gradient of a pruned weight is
exactly zero. On disk the layer writes a bitmask plus the kept values only (as compressed-tensors'
``sparse-bitmask`` does), so 50% unstructured sparsity shrinks an fp32 weight to 17 bits/weight:

    <name>.bitmask   uint8 (out, ceil(cols / 8))   little-endian bits, 1 = kept
    <name>.values    weight dtype (n_kept,)        kept weights in row-major order
    <name>.bias      (optional)

It registers with :data:`modelpress.export.saving.LAYER_CLASSES`, so ``save_compressed`` /
``load_compressed`` round-trip it bit for bit. :func:`densify` turns every such layer back into the
original class (plain ``nn.Linear`` / ``Conv1D`` / ``nn.Conv2d``), for files that plain
``transformers`` loads.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.errors import ModelpressError
from ..core.layers import SAVED_LAYERS
from ..models.layers import is_conv1d, set_submodule
from ..quant.activation import ConvGeometry
from .masks import as_matrix, mask_from_scores, pack_mask, unpack_mask
from .patterns import SparsityPattern, Unstructured, pattern_from_dict

Kind = Literal["linear", "conv1d", "conv2d"]


@SAVED_LAYERS.register("sparse")
class SparseLayer(nn.Module):
    """A layer computing with ``weight * mask`` (see module docstring).

    ``weight`` is (out, in) for linear kinds (an HF Conv1D is stored transposed back to (out, in))
    and (out, in / groups, kh, kw) for Conv2d.

    Example:
        >>> lin = nn.Linear(8, 4)
        >>> sl = SparseLayer.from_module(lin, lin.weight.abs() > 0.1)
        >>> sl(torch.randn(2, 8)).shape
        torch.Size([2, 4])
    """

    layer_tag = "sparse"

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None, kind: Kind = "linear",
                 conv: ConvGeometry | None = None, pattern: SparsityPattern | None = None) -> None:
        super().__init__()
        if mask.shape != weight.shape:
            raise ModelpressError(f"mask shape {tuple(mask.shape)} does not match weight {tuple(weight.shape)}")
        if (kind == "conv2d") != (conv is not None):
            raise ModelpressError("a conv2d SparseLayer needs its ConvGeometry (and only it does)")
        self.kind, self.conv = kind, conv
        self.pattern = pattern if pattern is not None else Unstructured()
        mask = mask.to(device=weight.device, dtype=torch.bool)
        self._check_pattern(mask)
        self.weight = nn.Parameter(weight.detach().masked_fill(~mask, 0))  # pruned entries: exactly +0.0
        self.register_buffer("mask", mask, persistent=False)  # saved packed, by _save_to_state_dict
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    # ---- what the rest of modelpress sees --------------------------------------------------
    @property
    def is_compressed_linear(self) -> bool:
        """Linear kinds are linear-like to layer discovery (data-free quantisers keep their zeros)."""
        return self.kind != "conv2d"

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_features(self) -> int:
        """Reduction length (in / groups * kh * kw for a convolution)."""
        return int(self.weight[0].numel())

    def effective_weight(self) -> torch.Tensor:
        """``weight * mask``: what the layer computes with (pruned entries +0.0, zero gradient)."""
        return self.weight.masked_fill(~self.mask, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.effective_weight().to(x.dtype)
        b = self.bias.to(x.dtype) if self.bias is not None else None
        if self.kind == "conv2d":
            g = self.conv
            return F.conv2d(x, w, b, g.stride, g.padding, g.dilation, g.groups)
        return F.linear(x, w, b)

    def sparsity(self) -> float:
        """Fraction of weights masked out."""
        return 1.0 - float(self.mask.float().mean())

    # ---- tightening during training --------------------------------------------------------
    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor) -> None:
        """Replace the mask (weight-shaped bool) and zero the newly pruned weights."""
        if mask.shape != self.weight.shape:
            raise ModelpressError(f"mask shape {tuple(mask.shape)} does not match weight {tuple(self.weight.shape)}")
        mask = mask.to(device=self.weight.device, dtype=torch.bool)
        self._check_pattern(mask)
        self.mask = mask
        self.weight.masked_fill_(~self.mask, 0)

    def _check_pattern(self, keep: torch.Tensor) -> None:
        """A mask that breaks the layer's declared pattern is refused: a 2:4 layer that is not 2:4
        would be exported and accelerated as if it were."""
        why = self.pattern.violation(keep)
        if why is not None:
            raise ModelpressError(f"mask breaks the layer's {self.pattern.label} pattern: {why}")

    @torch.no_grad()
    def update(self, scores: torch.Tensor, sparsity: float | None, *, monotone: bool = True,
               per_output: bool = True) -> torch.Tensor:
        """Tighten to ``sparsity`` by ``scores`` (weight-shaped, higher = keep) under the layer's pattern.

        With ``monotone`` a pruned weight stays pruned (its score is treated as the lowest).
        Returns the new mask. A schedule calls this every few steps with a rising sparsity.
        """
        s = scores.detach().float()
        if monotone:
            s = torch.where(self.mask, s, torch.full_like(s, torch.finfo(torch.float32).min))
        self.set_mask(mask_from_scores(s, self.pattern, sparsity, per_output=per_output))
        return self.mask

    # ---- construction and conversion ---------------------------------------------------------
    @classmethod
    def from_module(cls, module: nn.Module, mask: torch.Tensor, pattern: SparsityPattern | None = None,
                    name: str = "layer") -> "SparseLayer":
        """Wrap a Linear, HF Conv1D or Conv2d with ``mask`` (shaped like :func:`dense_weight` of it)."""
        w, kind, conv = dense_weight(module, name)
        bias = getattr(module, "bias", None)
        return cls(w, mask.reshape(w.shape), bias, kind, conv, pattern)

    def to_dense(self) -> nn.Module:
        """The original layer class holding ``weight * mask`` (what plain ``transformers`` loads)."""
        w = self.effective_weight().detach()
        has_bias = self.bias is not None
        if self.kind == "conv2d":
            g = self.conv
            out, in_g, kh, kw = w.shape
            m = nn.Conv2d(in_g * g.groups, out, (kh, kw), g.stride, g.padding, g.dilation, g.groups, bias=has_bias)
        elif self.kind == "conv1d":
            from transformers.pytorch_utils import Conv1D

            m = Conv1D(w.shape[0], w.shape[1])
            w = w.t()  # Conv1D stores (in, out)
        else:
            m = nn.Linear(w.shape[1], w.shape[0], bias=has_bias)
        m = m.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            m.weight.copy_(w)
            if has_bias:
                m.bias.copy_(self.bias)
        return m

    # ---- compact storage ---------------------------------------------------------------------
    def stored_bytes(self) -> int:
        """Bytes of bitmask + kept values (bias excluded)."""
        rows, cols = as_matrix(self.mask).shape
        return rows * -(-cols // 8) + int(self.mask.sum()) * self.weight.element_size()

    def manifest_entry(self) -> dict[str, Any]:
        """What ``modelpress.json`` records (read back by :meth:`from_saved`)."""
        return {"kind": self.kind, "shape": list(self.weight.shape), "bias": self.bias is not None,
                "dtype": str(self.weight.dtype).removeprefix("torch."), "pattern": self.pattern.to_dict(),
                "sparsity": self.sparsity(), "conv": self.conv.to_dict() if self.conv is not None else None,
                "bits_per_weight": 8.0 * self.stored_bytes() / self.weight.numel()}

    @classmethod
    def from_saved(cls, info: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "SparseLayer":
        """Rebuild from a manifest entry and the layer's own tensors (``bitmask``, ``values``, ``bias``)."""
        shape = tuple(info["shape"])
        w, mask = _unpack(tensors, shape)
        conv = ConvGeometry.from_dict(info["conv"]) if info.get("conv") else None
        return cls(w, mask, tensors.get("bias"), info["kind"], conv, pattern_from_dict(info["pattern"]))

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        if self.weight.is_meta:  # offloaded (low-memory mode): its checkpoint holds the real tensors
            destination[prefix + "bitmask"] = torch.empty(0, dtype=torch.uint8, device="meta")
            destination[prefix + "values"] = torch.empty(0, dtype=self.weight.dtype, device="meta")
            if self.bias is not None:
                destination[prefix + "bias"] = self.bias.detach()
            return
        w = self.weight if keep_vars else self.weight.detach()
        destination[prefix + "bitmask"] = pack_mask(self.mask)
        destination[prefix + "values"] = w[self.mask]  # (n_kept,) row-major
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        names = ["bitmask", "values"] + (["bias"] if self.bias is not None else [])
        missing = [prefix + n for n in names if prefix + n not in state_dict]
        missing_keys.extend(missing)
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and "." not in k[len(prefix):]
                                   and k[len(prefix):] not in names)
        if missing:
            return
        w, mask = _unpack({n: state_dict[prefix + n] for n in ("bitmask", "values")}, tuple(self.weight.shape))
        with torch.no_grad():
            self.weight.copy_(w)
            self.mask = mask.to(self.weight.device)
            if self.bias is not None:
                self.bias.copy_(state_dict[prefix + "bias"])

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, shape={tuple(self.weight.shape)}, pattern={self.pattern.to_dict()}, "
                f"sparsity={self.sparsity():.3f}")


def _unpack(tensors: dict[str, torch.Tensor], shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense weight, mask) from saved ``bitmask`` + ``values``; a count mismatch is an error."""
    mask = unpack_mask(tensors["bitmask"], shape)
    values = tensors["values"]
    if int(mask.sum()) != values.numel():
        raise ModelpressError(f"sparse layer: bitmask keeps {int(mask.sum())} weights but {values.numel()} values saved")
    w = torch.zeros(shape, dtype=values.dtype, device=values.device)
    w[mask] = values
    return w, mask


def dense_weight(module: nn.Module, name: str = "layer") -> tuple[torch.Tensor, Kind, ConvGeometry | None]:
    """(weight, kind, conv geometry) of a prunable layer; the weight is (out, in) for linear kinds."""
    if isinstance(module, SparseLayer):
        return module.effective_weight().detach(), module.kind, module.conv
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            raise ModelpressError(f"{name}: Conv2d padding_mode {module.padding_mode!r} is not supported (zeros only)")
        geom = ConvGeometry(stride=module.stride, padding=module.padding, dilation=module.dilation,
                            groups=module.groups)
        return module.weight.detach(), "conv2d", geom
    if is_conv1d(module):
        return module.weight.detach().t(), "conv1d", None
    if isinstance(module, nn.Linear):
        return module.weight.detach(), "linear", None
    if getattr(module, "is_compressed_linear", False):
        raise ModelpressError(f"{name}: already compressed ({type(module).__name__}); prune before quantising "
                              "(or use sparsegpt with a format for joint sparse + quantised weights)")
    raise ModelpressError(f"{name}: cannot prune a {type(module).__name__} (Linear, HF Conv1D and Conv2d only)")


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Linear, HF Conv1D, Conv2d, already-sparse and compressed-linear layers, in registration order.

    Compressed (quantised) linears are listed so that selecting one gives a clear error instead of
    being skipped silently.
    """
    return [(n, m) for n, m in model.named_modules()
            if n and (isinstance(m, (nn.Linear, nn.Conv2d, SparseLayer)) or is_conv1d(m)
                      or getattr(m, "is_compressed_linear", False))]


def densify(model: nn.Module) -> int:
    """Replace every :class:`SparseLayer` of ``model`` by its dense original class; returns how many."""
    names = [n for n, m in model.named_modules() if isinstance(m, SparseLayer)]
    for n in names:
        set_submodule(model, n, model.get_submodule(n).to_dense())
    return len(names)


def sparsity_summary(model: nn.Module) -> dict[str, Any]:
    """Zeros over all weights of sparse layers, per layer and in total (effective weights)."""
    layers, zeros, total = {}, 0, 0
    for n, m in model.named_modules():
        if isinstance(m, SparseLayer):
            z, t = int((m.effective_weight() == 0).sum()), m.weight.numel()
            layers[n] = z / t
            zeros, total = zeros + z, total + t
    return {"layers": layers, "zeros": zeros, "total": total, "sparsity": zeros / total if total else 0.0}
