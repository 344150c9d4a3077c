"""compressed-tensors codecs: our stored layers -> the tensors and scheme vLLM / transformers load.

Conventions (read off compressed-tensors 0.20's own compressors and ``QuantizationArgs``):

* **pack-quantized** (int 1..8 bits): ``weight_packed`` int32 (out, ceil(in * b / 32)), a dense
  LSB-first bit stream per row (element ``i`` at bit ``i * b``, rows padded to 32 elements);
  the stored value is ``q + 2**(b-1)`` for the signed code ``q``, which is exactly our unsigned
  code, so codes travel bit for bit. ``weight_scale`` (out, n_groups) / (out, 1) / (1,);
  ``weight_zero_point`` (asymmetric) is our integer zero minus ``2**(b-1)``, packed the same way
  along dim 0; ``weight_shape`` int64 (2,). Dequantised as ``(q - zp) * scale``: identical to ours.
* **float-quantized** (FP8 E4M3): ``weight`` as ``float8_e4m3fn`` (our codes reinterpreted) and
  ``weight_scale`` float32 (``w = fp8 * scale``, as ours).
* **nvfp4-pack-quantized**: E2M1 codes two per byte, low nibble first (our code layout is the
  library's ``sign << 3 | index``); ``weight_scale`` ``float8_e4m3fn`` per 16; the library divides
  by ``weight_global_scale``, so it stores the reciprocal of our multiplicative global scale.
* **mxfp4-pack-quantized**: as NVFP4 with ``weight_scale`` the uint8 E8M0 biased exponent per 32.

Groups must tile the row exactly (the library refuses a short last group), and E5M2, NF4 and
anything else has no compressed-tensors format: those raise :class:`Unrepresentable`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from ...core.config import Registry
from ...quant.formats.base import QTensor, WeightFormat
from ...quant.granularity import PerChannel, PerGroup, PerTensor
from ..plan import Unrepresentable


class CTCodec(ABC):
    """Base class: ``weight_args`` (the scheme's ``weights`` dict), ``compression_format``, ``encode``."""

    compression_format: str = ""

    @abstractmethod
    def weight_args(self, fmt: WeightFormat, shape: tuple[int, int]) -> dict[str, Any]:
        """The scheme's ``weights`` arguments for a layer of this format and shape."""

    @abstractmethod
    def encode(self, qt: QTensor) -> dict[str, torch.Tensor]:
        """The stored tensors (suffix -> tensor) of one layer."""


#: our format tag -> codec class; codec modules anywhere in ``modelpress.export.codecs`` register here.
CT_CODECS: Registry[type[CTCodec]] = Registry("compressed-tensors codec", packages=("modelpress.export.codecs",))


def codec_for(fmt: WeightFormat) -> CTCodec:
    """The codec for ``fmt``'s family; an unknown family is :class:`Unrepresentable`."""
    if fmt.type_tag not in CT_CODECS:
        raise Unrepresentable(f"compressed-tensors has no format for {fmt.type_tag} weights")
    return CT_CODECS.get(fmt.type_tag)()


def _strategy(fmt: WeightFormat, in_features: int) -> dict[str, Any]:
    """``strategy`` / ``group_size`` of a granularity; a short last group is unrepresentable."""
    g = fmt.granularity
    if isinstance(g, PerTensor):
        return {"group_size": None, "strategy": "tensor"}
    if isinstance(g, PerChannel):
        return {"group_size": None, "strategy": "channel"}
    assert isinstance(g, PerGroup)
    if in_features % g.size:
        raise Unrepresentable(f"group size {g.size} does not divide {in_features} input columns "
                              "(compressed-tensors needs whole groups)")
    return {"group_size": g.size, "strategy": "group"}


def _scale_shape(fmt: WeightFormat, t: torch.Tensor, out_features: int) -> torch.Tensor:
    """Our (rows, n_groups) parameter as the library's (out, n_groups) / (out, 1) / (1,)."""
    if isinstance(fmt.granularity, PerTensor):
        return t.reshape(1)
    return t.reshape(out_features, -1)


@CT_CODECS.register("int")
class IntPackCodec(CTCodec):
    """Integer grids -> ``pack-quantized`` (codes and zero points bit for bit)."""

    compression_format = "pack-quantized"

    def weight_args(self, fmt: WeightFormat, shape: tuple[int, int]) -> dict[str, Any]:
        return {"num_bits": fmt.bits, "type": "int", "symmetric": fmt.symmetric,  # type: ignore[attr-defined]
                **_strategy(fmt, shape[1]), "dynamic": False}

    def encode(self, qt: QTensor) -> dict[str, torch.Tensor]:
        fmt, (out_f, _) = qt.fmt, qt.shape
        bits = fmt.bits  # type: ignore[attr-defined]
        tensors = {"weight_packed": pack_int32(qt.codes, bits),
                   "weight_scale": _scale_shape(fmt, qt.params["scale"], out_f).contiguous(),
                   "weight_shape": torch.tensor(qt.shape, dtype=torch.int64)}
        if not fmt.symmetric:  # type: ignore[attr-defined]
            zero = _scale_shape(fmt, qt.params["zero"], out_f)
            if isinstance(fmt.granularity, PerTensor):  # the library keeps a tensor zero point unpacked
                tensors["weight_zero_point"] = (zero.to(torch.int32) - (1 << (bits - 1))).to(torch.int8)
            else:
                tensors["weight_zero_point"] = pack_int32(zero.t().contiguous(), bits).t().contiguous()
        return tensors


@CT_CODECS.register("fp8")
class FP8Codec(CTCodec):
    """FP8 E4M3 -> ``float-quantized`` (E5M2 has no compressed-tensors format)."""

    compression_format = "float-quantized"

    def weight_args(self, fmt: WeightFormat, shape: tuple[int, int]) -> dict[str, Any]:
        if fmt.variant != "e4m3":  # type: ignore[attr-defined]
            raise Unrepresentable("compressed-tensors FP8 is E4M3 only; this layer is E5M2")
        return {"num_bits": 8, "type": "float", "symmetric": True, **_strategy(fmt, shape[1]), "dynamic": False}

    def encode(self, qt: QTensor) -> dict[str, torch.Tensor]:
        return {"weight": qt.codes.contiguous().view(torch.float8_e4m3fn),
                "weight_scale": _scale_shape(qt.fmt, qt.params["scale"], qt.shape[0]).to(torch.float32).contiguous()}


@CT_CODECS.register("nvfp4")
class NVFP4Codec(CTCodec):
    """NVFP4 -> ``nvfp4-pack-quantized`` (E4M3 block scales, reciprocal global scale)."""

    compression_format = "nvfp4-pack-quantized"

    def weight_args(self, fmt: WeightFormat, shape: tuple[int, int]) -> dict[str, Any]:
        _strategy(fmt, shape[1])
        return {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 16, "strategy": "tensor_group",
                "dynamic": False, "scale_dtype": "torch.float8_e4m3fn"}

    def encode(self, qt: QTensor) -> dict[str, torch.Tensor]:
        g = qt.params["global_scale"].to(torch.float32).reshape(1)
        return {"weight_packed": _pack_nibbles(qt.codes),
                "weight_scale": qt.params["scale"].contiguous().view(torch.float8_e4m3fn),
                "weight_global_scale": torch.where(g > 0, 1.0 / g, torch.ones_like(g))}


@CT_CODECS.register("mxfp4")
class MXFP4Codec(CTCodec):
    """MXFP4 -> ``mxfp4-pack-quantized`` (E8M0 exponents as uint8)."""

    compression_format = "mxfp4-pack-quantized"

    def weight_args(self, fmt: WeightFormat, shape: tuple[int, int]) -> dict[str, Any]:
        _strategy(fmt, shape[1])
        return {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 32, "strategy": "group",
                "dynamic": False, "scale_dtype": "torch.uint8"}

    def encode(self, qt: QTensor) -> dict[str, torch.Tensor]:
        return {"weight_packed": _pack_nibbles(qt.codes), "weight_scale": qt.params["scale"].contiguous()}


# ---- packing ---------------------------------------------------------------------------------
def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Dense LSB-first packing of unsigned ``bits``-wide codes (rows, cols) into int32 words.

    Each row is padded to a multiple of 32 codes, so 32 codes fill exactly ``bits`` words; the
    result keeps ``ceil(cols * bits / 32)`` words per row (compressed-tensors' ``pack_to_int32``).
    """
    rows, cols = codes.shape
    n_words = -(-cols * bits // 32)
    pad = (-cols) % 32
    v = torch.nn.functional.pad(codes.to(torch.int64), (0, pad)).reshape(rows, -1, 32)  # (rows, n32, 32)
    words = torch.zeros(rows, v.shape[1], bits, dtype=torch.int64)
    for j in range(32):
        start = j * bits
        w, off = divmod(start, 32)
        words[:, :, w] |= (v[:, :, j] << off) & 0xFFFFFFFF
        if off + bits > 32:  # the code straddles two words
            words[:, :, w + 1] |= v[:, :, j] >> (32 - off)
    words = words.reshape(rows, -1)[:, :n_words]
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, the even column in the low nibble: (out, in) -> (out, in / 2) uint8."""
    c = codes.to(torch.uint8)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()


def nearest_representable(fmt: WeightFormat, shape: tuple[int, int]) -> WeightFormat:
    """A format compressed-tensors holds that is closest to ``fmt`` (for ``--on-unsupported requantize``).

    Integer grids keep bits and symmetry with the largest group size dividing the row (halving
    down to 16, else per channel); FP8 E5M2 becomes E4M3; anything else becomes symmetric int4
    with the largest of 128/64/32/16 that divides the row.
    """
    from ...quant.formats import format_from_dict

    in_f = shape[1]
    data = fmt.to_dict()
    if data["type"] == "int" and isinstance(fmt.granularity, PerGroup):
        g = fmt.granularity.size
        while g >= 16 and in_f % g:
            g //= 2
        data["granularity"] = {"kind": "group", "size": g} if g >= 16 else {"kind": "channel"}
        return format_from_dict(data)
    if data["type"] == "fp8":
        return format_from_dict({**data, "variant": "e4m3"})
    sizes = [g for g in (128, 64, 32, 16) if in_f % g == 0]
    gran: dict[str, Any] = {"kind": "group", "size": sizes[0]} if sizes else {"kind": "channel"}
    return format_from_dict({"type": "int", "bits": 4, "symmetric": True, "granularity": gran})

