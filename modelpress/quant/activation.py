"""W8A8 layers: int8 weights *and* int8 activations, multiplied in the integer domain.

Weight-only layers (:class:`~modelpress.quant.qlinear.QuantLinear`) dequantise the weight and run a
float matmul. These layers instead do what an int8 GEMM kernel does::

    x_q = clamp(round(x / s_x) + z_x)            int8, per token (dynamic) or per tensor (static)
    acc = x_q @ w_q^T - z_x * rowsum(w_q)        int32 accumulator (zero-point correction)
    y   = acc * s_x * s_w + b                    dequantise with activation x weight scales

``w_q`` is int8 with one symmetric scale per output channel (``s_w = max|W_o| / 127``). The integer
product runs through ``torch._int_mm`` where the backend accepts the shapes and otherwise through a
float64 matmul of the int8 values, which is exact (every partial sum is an integer below 2**53).

Every layer here stores only int8 codes, scales and zero points (its state dict is what a kernel
reads) and registers with :data:`modelpress.export.saving.LAYER_CLASSES` so it saves and reloads.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import model_validator

from ..core.config import Config
from ..core.errors import ModelpressError
from ..core.layers import SAVED_LAYERS
from ..models.layers import linear_weight, set_submodule
from ..core.method import LayerRecord, RunContext

QMAX = 127  # int8 weights use the symmetric grid [-127, 127]


# ---- the integer grid (pure maths) ---------------------------------------------------------------
def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` with zeros replaced by 1: an all-zero row then quantises to 0 instead of NaN."""
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def int_grid(bits: int = 8, symmetric: bool = True) -> tuple[int, int]:
    """(qmin, qmax) of a signed ``bits``-wide grid; the symmetric one leaves -2**(bits-1) unused."""
    qmax = (1 << (bits - 1)) - 1
    return (-qmax if symmetric else -qmax - 1), qmax


def act_qparams(lo: torch.Tensor, hi: torch.Tensor, symmetric: bool, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of the signed grid covering [lo, hi] (any broadcastable shapes).

    Symmetric: ``s = max(|lo|, |hi|) / 127``, zero 0, codes in [-127, 127]. Asymmetric: the range
    widened to contain 0 is split into 255 steps and the integer ``zero`` is the code of 0.0, so
    zero padding (convolutions) and zero activations stay exact.

    Example:
        >>> act_qparams(torch.tensor(-1.0), torch.tensor(2.54), True)
        (tensor(0.0200), tensor(0, dtype=torch.int32))
    """
    lo, hi = lo.float().clamp_max(0), hi.float().clamp_min(0)
    qmin, qmax = int_grid(bits, symmetric)
    if symmetric:
        return _nonzero(torch.maximum(-lo, hi) / qmax), torch.zeros_like(lo, dtype=torch.int32)
    scale = _nonzero((hi - lo) / (qmax - qmin))
    zero = torch.round(qmin - lo / scale).clamp(qmin, qmax).to(torch.int32)
    return scale, zero


def quantize_act(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, symmetric: bool,
                 bits: int = 8) -> torch.Tensor:
    """int8 codes ``clamp(round(x / scale) + zero, qmin, qmax)``."""
    qmin, qmax = int_grid(bits, symmetric)
    return (torch.round(x.float() / scale) + zero).clamp(qmin, qmax).to(torch.int8)


def fake_quantize_act(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, symmetric: bool,
                      bits: int = 8) -> torch.Tensor:
    """Quantise then dequantise (what the grid keeps of ``x``), float32."""
    return (quantize_act(x, scale, zero, symmetric, bits).float() - zero) * scale


def per_token_qparams(x: torch.Tensor, symmetric: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token (scale, zero), each (n, 1), for ``x`` of shape (n, in)."""
    return act_qparams(x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), symmetric)


def per_tensor_qparams(x: torch.Tensor, symmetric: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-tensor (scale, zero), each 0-d, from the whole of ``x``."""
    return act_qparams(x.amin(), x.amax(), symmetric)


def quantize_weight_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes (same shape as ``w``) and one float32 scale per output channel (out,).

    ``s_o = max|W_o| / 127`` over every dimension but the first (rows of a Linear weight, output
    channels of a convolution), as in SmoothQuant's and LLM.int8()'s reference kernels.
    """
    wf = w.detach().float()
    scale = _nonzero(wf.abs().reshape(wf.shape[0], -1).amax(-1) / QMAX)  # (out,)
    view = (-1,) + (1,) * (w.dim() - 1)
    q = torch.round(wf / scale.view(view)).clamp(-QMAX, QMAX).to(torch.int8)
    return q, scale


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ b.T`` of int8 matrices a (n, k), b (m, k) as int32 (n, m).

    ``torch._int_mm`` where the backend takes the shapes (CUDA wants n > 16 and k, m multiples of 8),
    else a float64 matmul of the codes: |partial sums| <= k * 128 * 127 < 2**53, so it is exact.
    """
    n, k = a.shape
    ok = a.device.type == "cpu" or (a.device.type == "cuda" and n > 16 and k % 8 == 0 and b.shape[0] % 8 == 0)
    if ok:
        try:
            return torch._int_mm(a.contiguous(), b.t())
        except (RuntimeError, NotImplementedError):
            pass
    return (a.double() @ b.double().t()).round().to(torch.int32)


# ---- configs -------------------------------------------------------------------------------------
class ActQuantSpec(Config):
    """How a W8A8 layer quantises its activations (weights are always int8 per output channel).

    Fields:
        mode: ``dynamic`` (qparams computed from each input at run time) or ``static`` (a calibrated
            scale / zero point stored with the layer).
        granularity: ``per_token`` (one scale per row of the flattened input; dynamic only) or
            ``per_tensor``.
        symmetric: zero point fixed at 0, or an integer zero point (static: calibrated; dynamic:
            computed with the scale).

    Example:
        >>> ActQuantSpec(mode="static", granularity="per_tensor", symmetric=False).to_dict()["type"]
        'w8a8'
    """

    type: Literal["w8a8"] = "w8a8"
    mode: Literal["dynamic", "static"] = "dynamic"
    granularity: Literal["per_token", "per_tensor"] = "per_token"
    symmetric: bool = True

    @model_validator(mode="after")
    def _static_is_per_tensor(self) -> "ActQuantSpec":
        if self.mode == "static" and self.granularity != "per_tensor":
            raise ValueError("static activation scales are per_tensor (token counts vary at run time)")
        return self


class ConvGeometry(Config):
    """The hyper-parameters of a Conv2d that the int8 layer must reproduce."""

    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | Literal["same", "valid"] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1


# ---- layers --------------------------------------------------------------------------------------
class Int8WeightModule(nn.Module):
    """Storage shared by the int8-weight layers: int8 ``qweight``, float32 ``weight_scale`` (out,),
    optional ``bias`` and whatever else a subclass keeps; manifest entry and rebuild from tensors.
    """

    layer_tag: ClassVar[str]
    spec_class: ClassVar[type[Config]]

    def __init__(self, spec: Config, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.spec = spec
        bias = tensors.get("bias")
        self._tensor_names = tuple(k for k in tensors if k != "bias" and tensors[k] is not None)
        for k in self._tensor_names:
            self.register_buffer(k, tensors[k].detach().contiguous())
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        # in_features: the reduction length (in/groups * kh * kw for a convolution)
        self.out_features, self.in_features = int(self.qweight.shape[0]), int(self.qweight[0].numel())

    @property
    def fmt(self) -> Config:
        """The layer's spec (what the manifest records as ``format``)."""
        return self.spec

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight the int8 codes stand for, same shape as ``qweight``."""
        view = (-1,) + (1,) * (self.qweight.dim() - 1)
        return (self.qweight.float() * self.weight_scale.view(view)).to(dtype)

    def stored_bytes(self) -> int:
        """Bytes of codes, scales and zero points (bias excluded)."""
        return sum(getattr(self, k).numel() * getattr(self, k).element_size() for k in self._tensor_names)

    def manifest_entry(self) -> dict[str, Any]:
        """What ``modelpress.json`` records for this layer (read back by :meth:`from_saved`)."""
        return {"format": self.spec.to_dict(), "shape": list(self.qweight.shape), "bias": self.bias is not None,
                "bits_per_weight": 8.0 * self.stored_bytes() / self.qweight.numel()}

    @classmethod
    def from_saved(cls, info: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "Int8WeightModule":
        """Rebuild from a manifest entry and the layer's own saved tensors."""
        if list(tensors["qweight"].shape) != list(info["shape"]):
            raise ModelpressError(f"saved qweight has shape {list(tensors['qweight'].shape)}, manifest says {info['shape']}")
        return cls(cls.spec_class.from_dict(info["format"]), tensors)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.spec.to_dict()}"


class _ActQuantMixin:
    """Activation qparams of a W8A8 layer: stored (static) or computed from ``x`` (dynamic)."""

    spec: ActQuantSpec
    transforms_activations: ClassVar[bool] = True  # its input is quantised to int8 (core.layers)

    def act_qparams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) for ``x`` (n, in) or any tensor when per-tensor."""
        if self.spec.mode == "static":
            zero = getattr(self, "act_zero", None)
            return self.act_scale, (zero if zero is not None else torch.zeros_like(self.act_scale, dtype=torch.int32))
        if self.spec.granularity == "per_token":
            return per_token_qparams(x, self.spec.symmetric)
        return per_tensor_qparams(x, self.spec.symmetric)


def _static_tensors(spec: ActQuantSpec, act_scale: torch.Tensor | None, act_zero: torch.Tensor | None) -> dict:
    """The stored activation qparams a static spec needs (none for dynamic)."""
    if spec.mode == "dynamic":
        return {}
    if act_scale is None:
        raise ModelpressError("a static W8A8 layer needs a calibrated act_scale")
    out = {"act_scale": act_scale.detach().float().reshape(1)}
    if not spec.symmetric:
        out["act_zero"] = (act_zero if act_zero is not None else torch.zeros(1)).to(torch.int32).reshape(1)
    return out


@SAVED_LAYERS.register("w8a8_linear")
class ActQuantLinear(_ActQuantMixin, Int8WeightModule):
    """Linear with int8 weight and int8 activations (W8A8), integer matmul.

    Example:
        >>> lin = nn.Linear(64, 32)
        >>> q = ActQuantLinear.from_linear(lin, ActQuantSpec())   # dynamic per-token
        >>> q(torch.randn(2, 5, 64)).shape
        torch.Size([2, 5, 32])
    """

    is_compressed_linear = True
    layer_tag = "w8a8_linear"
    spec_class = ActQuantSpec

    @classmethod
    def from_linear(cls, module: nn.Module, spec: ActQuantSpec, act_scale: torch.Tensor | None = None,
                    act_zero: torch.Tensor | None = None) -> "ActQuantLinear":
        """Quantise a Linear (or HF Conv1D) weight; static specs take the calibrated qparams."""
        qweight, scale = quantize_weight_per_channel(linear_weight(module))  # (out, in), (out,)
        bias = getattr(module, "bias", None)
        return cls(spec, {"qweight": qweight, "weight_scale": scale, "bias": bias,
                          **_static_tensors(spec, act_scale, act_zero)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        X = x.reshape(-1, self.in_features).float()  # (n, in)
        s_x, z_x = self.act_qparams(X)  # (n, 1) or (1,)
        X_q = quantize_act(X, s_x, z_x, self.spec.symmetric)  # (n, in) int8
        acc = int8_matmul(X_q, self.qweight)  # (n, out) int32
        if not self.spec.symmetric:
            acc = acc - z_x * self.qweight.sum(-1, dtype=torch.int32)  # remove the zero point's share
        y = acc.float() * s_x * self.weight_scale  # (n, out)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


@SAVED_LAYERS.register("w8a8_conv2d")
class ActQuantConv2d(_ActQuantMixin, Int8WeightModule):
    """Conv2d with int8 weight (one scale per output channel) and per-tensor int8 activations.

    The convolution runs on the zero-point-centred codes ``x_q - z`` so that zero padding means a
    float 0.0, exactly as in the float layer; float64 makes the integer sums exact.

    Example:
        >>> conv = nn.Conv2d(3, 8, 3, padding=1)
        >>> q = ActQuantConv2d.from_conv(conv, ActQuantSpec(granularity="per_tensor"))
        >>> q(torch.randn(2, 3, 8, 8)).shape
        torch.Size([2, 8, 8, 8])
    """

    layer_tag = "w8a8_conv2d"
    spec_class = ActQuantSpec

    def __init__(self, spec: ActQuantSpec, tensors: dict[str, torch.Tensor], geometry: ConvGeometry) -> None:
        if spec.granularity != "per_tensor":
            raise ModelpressError("an int8 Conv2d quantises activations per tensor (per_token is for linears)")
        super().__init__(spec, tensors)
        self.geometry = geometry

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, spec: ActQuantSpec, act_scale: torch.Tensor | None = None,
                  act_zero: torch.Tensor | None = None) -> "ActQuantConv2d":
        """Quantise ``conv``'s weight per output channel; static specs take the calibrated qparams."""
        if conv.padding_mode != "zeros":
            raise ModelpressError(f"int8 Conv2d supports zero padding only, got padding_mode={conv.padding_mode!r}")
        qweight, scale = quantize_weight_per_channel(conv.weight)  # (out, in/g, kh, kw), (out,)
        geom = ConvGeometry(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)
        return cls(spec, {"qweight": qweight, "weight_scale": scale, "bias": conv.bias,
                          **_static_tensors(spec, act_scale, act_zero)}, geom)

    @classmethod
    def from_saved(cls, info: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "ActQuantConv2d":
        return cls(ActQuantSpec.from_dict(info["format"]), tensors, ConvGeometry.from_dict(info["conv"]))

    def manifest_entry(self) -> dict[str, Any]:
        return {**super().manifest_entry(), "conv": self.geometry.to_dict()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, in, H, W)
        s_x, z_x = self.act_qparams(x)  # 0-d or (1,)
        centred = quantize_act(x, s_x, z_x, self.spec.symmetric).double() - z_x.double()  # (batch, in, H, W)
        g = self.geometry
        acc = F.conv2d(centred, self.qweight.double(), None, g.stride, g.padding, g.dilation, g.groups)  # exact ints
        y = acc.float() * s_x * self.weight_scale.view(1, -1, 1, 1)  # (batch, out, H', W')
        if self.bias is not None:
            y = y + self.bias.float().view(1, -1, 1, 1)
        return y.to(x.dtype)


# ---- lifecycle helpers shared by the int8 methods --------------------------------------------------
def install_int8(model: nn.Module, name: str, new: Int8WeightModule) -> Int8WeightModule:
    """Put ``new`` in place of the module called ``name``."""
    set_submodule(model, name, new)
    return new


def record_int8(ctx: RunContext, method: str, name: str, w: torch.Tensor, layer: Int8WeightModule,
                **extra: Any) -> LayerRecord:
    """Append the per-layer report row: spec, true bits per weight, relative weight error."""
    q = layer.dequantized_weight().reshape(w.shape)
    rel = float((w - q).norm() / w.norm().clamp_min(1e-12))
    shape = (layer.out_features, layer.in_features)
    rec = LayerRecord(name, method, layer.spec.to_dict(), shape, 8.0 * layer.stored_bytes() / w.numel(), rel, **extra)
    ctx.layers.append(rec)
    return rec


__all__ = [
    "ActQuantConv2d", "ActQuantLinear", "ActQuantSpec", "ConvGeometry", "Int8WeightModule", "act_qparams",
    "fake_quantize_act", "int8_matmul", "int_grid", "install_int8", "per_tensor_qparams", "per_token_qparams",
    "quantize_act", "quantize_weight_per_channel", "record_int8",
]
