"""CPU kernels built on the packed int4/int8 matmuls PyTorch ships.

``int4pack`` (``_convert_weight_to_int4pack_for_cpu`` + ``_weight_int4pack_mm_for_cpu``). In torch
2.13 the packer takes an int32 (N, K) tensor of codes ``q`` in 0..15 and the matmul takes
``qScaleAndZeros`` of shape (K / g, N, 2) in the activation dtype, decoding

    w[n, k] = (q[n, k] - 8) * scale[k // g, n] + zero[k // g, n]

with g in {32, 64, 128, 256} and N a multiple of 16 (checked by probing the ops; the zero is in
the float domain, torchao's "tinygemm" convention). Our :class:`IntFormat` decodes
``(c - mid) * s`` (symmetric, ``mid = 2**(bits-1)``) or ``(c - zero) * s`` (asymmetric), so

    symmetric:  q = c - mid + 8,  zero = 0
    asymmetric: q = c,            zero = (8 - zero_point) * s

which is exact for every width up to 4 bits. Our group G becomes the kernel's g by repeating each
scale G / g times (g the largest allowed size dividing both G and K), so a short last group (576
columns in groups of 128) and per-channel scales are represented exactly too.

``int8pack`` (``_weight_int8pack_mm``): an int8 (N, K) matrix times a per-row scale. Symmetric
per-channel codes map to ``c - mid``; an asymmetric zero point adds ``sum_k(x) * (mid - zero) * s``.

``int8-dynamic``: fbgemm's dynamically quantised linear (activations quantised to int8 per call,
int8 x int8 -> int32). It changes the numerics (the activations are rounded too), so it is never
picked automatically; name it to use it.
"""
from __future__ import annotations


import torch
import torch.nn as nn

from ..quant.formats.base import QTensor
from ..quant.formats.integer import IntFormat
from ..quant.granularity import PerChannel, PerGroup, PerTensor
from .reference import KernelLinear
from .registry import KERNELS

INT4_GROUPS = (256, 128, 64, 32)
_DTYPES = (torch.bfloat16, torch.float32, torch.float16)


def _int_params(qt: QTensor) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """(scale (N, n_groups) fp32, zero point (N, n_groups) fp32 or None, columns per group)."""
    n, k = qt.shape
    scale = qt.params["scale"].to(torch.float32)
    zero = qt.params["zero"].to(torch.float32) if "zero" in qt.params else None
    if isinstance(qt.fmt.granularity, PerTensor):  # one value for everything: one "group" per row
        scale = scale.reshape(1, 1).expand(n, 1)
        zero = zero.reshape(1, 1).expand(n, 1) if zero is not None else None
    return scale, zero, qt.fmt.group_size(k)


def int4_group(qt: QTensor) -> int | None:
    """The int4pack group size that represents ``qt``'s groups exactly, or None."""
    k = qt.shape[1]
    group = k if isinstance(qt.fmt.granularity, (PerChannel, PerTensor)) else qt.fmt.group_size(k)
    return next((g for g in INT4_GROUPS if group % g == 0 and k % g == 0), None)


def to_int4pack(qt: QTensor, dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(packed weight, qScaleAndZeros (K/g, N, 2), g) for the CPU int4 kernel, from an IntFormat QTensor."""
    fmt: IntFormat = qt.fmt  # type: ignore[assignment]
    g = int4_group(qt)
    assert g is not None and fmt.bits <= 4
    n, k = qt.shape
    scale, zero, group = _int_params(qt)
    rep = group // g
    scale_k = scale.repeat_interleave(rep, dim=1)[:, : k // g]  # (N, K/g)
    if fmt.symmetric:
        q = qt.codes.to(torch.int32) - fmt.mid + 8  # (N, K) in 0..15
        zero_k = torch.zeros_like(scale_k)
    else:
        q = qt.codes.to(torch.int32)
        zero_k = (8.0 - zero.repeat_interleave(rep, dim=1)[:, : k // g]) * scale_k  # exact in fp32
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 2)
    sz = torch.stack([scale_k.t(), zero_k.t()], dim=-1).to(dtype).contiguous()  # (K/g, N, 2)
    return packed, sz, g


class Int4PackLinear(KernelLinear):
    """Weight-only int4 linear on ``_weight_int4pack_mm_for_cpu``."""

    kernel_name = "int4pack"

    def __init__(self, qt: QTensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__(qt.shape[0], qt.shape[1], bias, dtype)
        packed, sz, self.group = to_int4pack(qt, dtype)
        self.register_buffer("packed", packed)
        self.register_buffer("scale_and_zero", sz)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:  # (tokens, in) -> (tokens, out)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group, self.scale_and_zero)


def _is_int(qt: QTensor) -> IntFormat | None:
    return qt.fmt if isinstance(qt.fmt, IntFormat) else None


@KERNELS.register
class Int4PackKernel:
    """int2..int4 weights, any group size that a kernel group (32..256) divides, N % 16 == 0."""

    name = "int4pack"
    op = "linear"
    formats = ("int",)
    backend = "cpu"
    priority = 20
    tested = True

    @classmethod
    def unsupported(cls, qt: QTensor, device: torch.device) -> str | None:
        fmt = _is_int(qt)
        if fmt is None:
            return f"{qt.fmt.type_tag} is not an integer format"
        if fmt.bits > 4:
            return f"{fmt.bits}-bit codes do not fit 4 bits"
        if qt.shape[0] % 16:
            return f"out_features {qt.shape[0]} is not a multiple of 16"
        if int4_group(qt) is None:
            return (f"no kernel group size in {INT4_GROUPS} divides both the group "
                    f"({fmt.group_size(qt.shape[1])}) and in_features ({qt.shape[1]})")
        if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            return f"torch {torch.__version__} has no _weight_int4pack_mm_for_cpu"
        return None

    @classmethod
    def build(cls, qt: QTensor, bias: torch.Tensor | None, device: torch.device,
              dtype: torch.dtype = torch.bfloat16) -> nn.Module:
        return Int4PackLinear(qt, bias, dtype)


def to_int8pack(qt: QTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(int8 (N, K), scale (N,) fp32, zero correction (N,) fp32 or None) for ``_weight_int8pack_mm``."""
    fmt: IntFormat = qt.fmt  # type: ignore[assignment]
    scale, zero, _ = _int_params(qt)
    scale = scale[:, 0]
    w8 = (qt.codes.to(torch.int16) - fmt.mid).to(torch.int8)  # (N, K); codes - mid is in int8 range
    corr = None if zero is None else (fmt.mid - zero[:, 0]) * scale  # y += sum_k(x) * corr
    return w8.contiguous(), scale.contiguous(), corr


class Int8PackLinear(KernelLinear):
    """Weight-only per-channel int8 linear on ``_weight_int8pack_mm``."""

    kernel_name = "int8pack"

    def __init__(self, qt: QTensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__(qt.shape[0], qt.shape[1], bias, dtype)
        w8, scale, corr = to_int8pack(qt)
        self.register_buffer("weight_int8", w8)
        self.register_buffer("scale", scale.to(dtype))
        self.register_buffer("zero_corr", corr.to(dtype) if corr is not None else None)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x, self.weight_int8, self.scale)
        if self.zero_corr is not None:
            y = y + x.sum(dim=-1, keepdim=True) * self.zero_corr
        return y


def _per_channel(qt: QTensor) -> bool:
    g = qt.fmt.granularity
    return isinstance(g, (PerChannel, PerTensor)) or (isinstance(g, PerGroup) and g.size >= qt.shape[1])


@KERNELS.register
class Int8PackKernel:
    """Per-channel (or per-tensor) integer weights of any width, int8 storage."""

    name = "int8pack"
    op = "linear"
    formats = ("int",)
    backend = "cpu"
    priority = 10
    tested = True

    @classmethod
    def unsupported(cls, qt: QTensor, device: torch.device) -> str | None:
        if _is_int(qt) is None:
            return f"{qt.fmt.type_tag} is not an integer format"
        if not _per_channel(qt):
            return f"it needs one scale per output channel, weight has groups of {qt.fmt.group_size(qt.shape[1])}"
        return None

    @classmethod
    def build(cls, qt: QTensor, bias: torch.Tensor | None, device: torch.device,
              dtype: torch.dtype = torch.bfloat16) -> nn.Module:
        return Int8PackLinear(qt, bias, dtype)


class Int8DynamicLinear(KernelLinear):
    """fbgemm dynamic int8 linear: activations quantised per call (fp32 in, fp32 out)."""

    kernel_name = "int8-dynamic"

    def __init__(self, qt: QTensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__(qt.shape[0], qt.shape[1], None, torch.float32)
        w8, scale, _ = to_int8pack(qt)
        torch.backends.quantized.engine = "fbgemm" if "fbgemm" in torch.backends.quantized.supported_engines \
            else torch.backends.quantized.engine
        qw = torch._make_per_channel_quantized_tensor(w8, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
        b = bias.detach().float() if bias is not None else None
        self._packed = torch.ops.quantized.linear_prepack(qw, b)  # opaque: not a buffer, not saved

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self._packed, True)


@KERNELS.register
class Int8DynamicKernel:
    """Symmetric per-channel int8 weights with int8 activations (fbgemm); only when named."""

    name = "int8-dynamic"
    op = "linear"
    formats = ("int",)
    backend = "cpu"
    priority = -1
    tested = True

    @classmethod
    def unsupported(cls, qt: QTensor, device: torch.device) -> str | None:
        fmt = _is_int(qt)
        if fmt is None:
            return f"{qt.fmt.type_tag} is not an integer format"
        if not fmt.symmetric or not _per_channel(qt):
            return "it needs symmetric per-channel weights"
        if "fbgemm" not in torch.backends.quantized.supported_engines:
            return "this torch build has no fbgemm engine"
        return None

    @classmethod
    def build(cls, qt: QTensor, bias: torch.Tensor | None, device: torch.device,
              dtype: torch.dtype = torch.float32) -> nn.Module:
        return Int8DynamicLinear(qt, bias, dtype)
