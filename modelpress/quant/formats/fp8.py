"""FP8 (OCP E4M3 "fn" and E5M2) weights with a float32 scale, and the bit-level codec.

The codec is written in integer arithmetic rather than through ``torch.float8_*`` casts so that it
runs on any device and torch version and so that its rounding is spelled out: round to nearest,
ties to even, gradual underflow into subnormals, NaN kept as NaN (code 0x7F, sign preserved).
E4M3 has no infinity (max 448); E5M2 has infinities (max finite 57344).

``encode_fp8(x, "e4m3")`` equals ``x.to(torch.float8_e4m3fn).view(torch.uint8)`` (torch saturates
E4M3), and ``encode_fp8(x, "e5m2", saturate=False)`` equals the ``torch.float8_e5m2`` cast (torch
overflows E5M2 to infinity); the tests check both bit for bit.
"""
from __future__ import annotations

from typing import ClassVar, Literal, NamedTuple

import torch

from .base import FORMATS, Params, WeightFormat


class _Fp8Spec(NamedTuple):
    mbits: int  # mantissa bits
    bias: int  # exponent bias
    max_code: int  # code of the largest finite magnitude
    overflow_code: int  # non-saturating overflow: NaN (E4M3) or infinity (E5M2)
    fmax: float


_SPECS = {
    "e4m3": _Fp8Spec(mbits=3, bias=7, max_code=0x7E, overflow_code=0x7F, fmax=448.0),
    "e5m2": _Fp8Spec(mbits=2, bias=15, max_code=0x7B, overflow_code=0x7C, fmax=57344.0),
}

Variant = Literal["e4m3", "e5m2"]


def fp8_max(variant: Variant) -> float:
    """Largest finite value: 448 (E4M3) or 57344 (E5M2)."""
    return _SPECS[variant].fmax


def encode_fp8(x: torch.Tensor, variant: Variant = "e4m3", saturate: bool = True) -> torch.Tensor:
    """FP8 bit patterns (uint8, same shape) of ``x`` rounded to nearest even.

    ``x`` is first converted to float32 (as torch does). Overflow, including infinities, goes to
    ±max finite when ``saturate``, else to NaN (E4M3) or ±infinity (E5M2).

    Example:
        >>> encode_fp8(torch.tensor([1.0, -448.0, 1000.0]), "e4m3")
        tensor([ 56, 254, 126], dtype=torch.uint8)
    """
    spec = _SPECS[variant]
    xf = x.to(torch.float32).contiguous()
    bits = xf.view(torch.int32).to(torch.int64)
    sign = (bits >> 31) & 1
    mag = bits & 0x7FFFFFFF  # |x| as float32 bits
    code = torch.where(mag < ((128 - spec.bias) << 23), _subnormal_code(xf, spec), _normal_code(mag, spec))
    overflow = code > spec.max_code
    code = torch.where(overflow, spec.max_code if saturate else spec.overflow_code, code)
    code = torch.where(mag > 0x7F800000, 0x7F, code)  # NaN
    return (code | (sign << 7)).to(torch.uint8)


def decode_fp8(codes: torch.Tensor, variant: Variant = "e4m3") -> torch.Tensor:
    """Float32 values of FP8 bit patterns (uint8); every value is exact in float32.

    Example:
        >>> decode_fp8(torch.tensor([56, 254, 127], dtype=torch.uint8), "e4m3")
        tensor([   1., -448.,   nan])
    """
    spec = _SPECS[variant]
    c = codes.to(torch.int64)
    exp = (c >> spec.mbits) & ((1 << (7 - spec.mbits)) - 1)
    man = (c & ((1 << spec.mbits) - 1)).to(torch.float64)
    # subnormal: man * 2**(1 - bias - mbits); normal: (2**mbits + man) * 2**(exp - bias - mbits)
    sig = torch.where(exp == 0, man, man + (1 << spec.mbits))
    val = sig * torch.exp2((exp.clamp_min(1) - spec.bias - spec.mbits).to(torch.float64))
    val = torch.where(c & 0x80 != 0, -val, val)
    return torch.where(_special(c, spec), _special_value(c, spec), val).to(torch.float32)


@FORMATS.register("fp8")
class FP8Format(WeightFormat):
    """FP8 weights, ``w ≈ fp8(w / scale) * scale`` with ``scale = amax / fmax`` in float32.

    Fields:
        variant: ``e4m3`` (more precision, max 448) or ``e5m2`` (more range, max 57344).
        granularity: per tensor, channel (default) or group.

    Example:
        >>> qt = FP8Format(variant="e4m3").quantize(torch.randn(4, 32))
        >>> qt.bits_per_weight()
        9.0
    """

    code_bits: ClassVar[int] = 8

    type: Literal["fp8"] = "fp8"
    variant: Variant = "e4m3"

    def fit(self, w: torch.Tensor) -> Params:
        """``scale = amax / fmax`` per group of ``w`` (rows, n_groups, G)."""
        return {"scale": w.abs().amax(dim=-1, keepdim=True) / fp8_max(self.variant)}

    def encode(self, w: torch.Tensor, params: Params) -> torch.Tensor:
        """FP8 codes of ``w / scale``, saturating at ±fmax (fp32 rounding can overshoot by an ulp)."""
        return encode_fp8(w / _nonzero(params["scale"]), self.variant, saturate=True)

    def decode(self, codes: torch.Tensor, params: Params) -> torch.Tensor:
        """``fp8(codes) * scale`` as float32; scale 0 gives exactly 0."""
        return decode_fp8(codes, self.variant) * params["scale"].to(torch.float32)

    def store_params(self, params: Params) -> Params:
        """float32 scale (rows, n_groups): fp16 would underflow/overflow for tiny/huge weights."""
        return {"scale": params["scale"].squeeze(-1).to(torch.float32)}


# ---- codec internals ---------------------------------------------------------------------------
def _normal_code(mag: torch.Tensor, spec: _Fp8Spec) -> torch.Tensor:
    """Code of a float32 magnitude (int64 bits) in the normal range, rounded to nearest even.

    Rebiasing the exponent in place keeps exponent and mantissa contiguous, so a carry out of the
    mantissa bumps the exponent (and past the top, the result exceeds ``max_code``: overflow).
    """
    shift = 23 - spec.mbits
    t = mag - ((127 - spec.bias) << 23)
    return (t + (1 << (shift - 1)) - 1 + ((t >> shift) & 1)) >> shift


def _subnormal_code(xf: torch.Tensor, spec: _Fp8Spec) -> torch.Tensor:
    """Code of |x| below the smallest normal: |x| in units of the smallest subnormal, half-even.

    Scaling by a power of two is exact in float64 and ``torch.round`` ties to even; a result of
    ``2**mbits`` is the smallest normal, whose code is exactly that integer.
    """
    units = xf.to(torch.float64).abs() * 2.0 ** (spec.bias - 1 + spec.mbits)
    return torch.round(torch.nan_to_num(units)).to(torch.int64)


def _special(c: torch.Tensor, spec: _Fp8Spec) -> torch.Tensor:
    """NaN codes (both variants) and infinities (E5M2: exponent all ones)."""
    if spec.overflow_code == 0x7F:  # E4M3: only S.1111.111 is special
        return (c & 0x7F) == 0x7F
    return (c & 0x7F) >= 0x7C


def _special_value(c: torch.Tensor, spec: _Fp8Spec) -> torch.Tensor:
    inf = torch.where(c & 0x80 != 0, -torch.inf, torch.inf).to(torch.float64)
    is_inf = ((c & 0x7F) == 0x7C) if spec.overflow_code == 0x7C else torch.zeros_like(c, dtype=torch.bool)
    return torch.where(is_inf, inf, torch.full_like(inf, torch.nan))


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    """Zeros replaced by 1, so an all-zero group divides to 0 instead of NaN."""
    return torch.where(scale == 0, torch.ones_like(scale), scale)
