"""FP4 E2M1 element formats with block scales: MXFP4 (OCP MX v1.0) and NVFP4 (NVIDIA).

E2M1 magnitudes are {0, 0.5, 1, 1.5, 2, 3, 4, 6}; a code is ``sign << 3 | index`` (index into
that list, which is also the E2M1 bit pattern). Encoding rounds to the nearest value, ties to the
even index (even mantissa, as in IEEE round-half-even), and saturates at ±6.

* **MXFP4**: blocks of 32 share an E8M0 scale ``X = 2**(floor(log2(amax)) - 2)`` (2 being the
  largest E2M1 exponent), stored as its biased exponent (uint8, bias 127). ``amax / X`` lies in
  [4, 8), so values above 6 clamp to 6, as the spec prescribes.
* **NVFP4**: blocks of 16 with scale ``amax_block / 6`` stored in FP8 E4M3, relative to one fp32
  global scale ``amax_tensor / (448 * 6)`` so that every block scale fits E4M3 (NVIDIA's recipe:
  TensorRT Model Optimizer's ``weight_scale`` and ``weight_scale_2``).
"""
from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import field_validator

from ..granularity import Granularity, PerGroup
from .base import FORMATS, Params, WeightFormat
from .fp8 import decode_fp8, encode_fp8

#: E2M1 magnitudes in code (= bit pattern) order.
E2M1_VALUES: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
_E2M1_EMAX = 2  # exponent of the largest E2M1 value (6 = 1.5 * 2**2)


def encode_e2m1(x: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8 in [0, 16)) of ``x``: nearest value, ties to even index, saturating.

    Example:
        >>> encode_e2m1(torch.tensor([0.25, 0.75, 2.5, -5.0, 7.0]))
        tensor([ 0,  2,  4, 14,  7], dtype=torch.uint8)
    """
    a = x.abs().to(torch.float32)
    idx = torch.zeros_like(a, dtype=torch.uint8)
    for k in range(len(E2M1_VALUES) - 1):
        mid = (E2M1_VALUES[k] + E2M1_VALUES[k + 1]) / 2
        # A tie at ``mid`` stays at k when k is even and moves up to the even k + 1 otherwise.
        idx += (a > mid) if k % 2 == 0 else (a >= mid)
    return idx | (torch.signbit(x).to(torch.uint8) << 3)


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """Float32 values of E2M1 codes (uint8, low 4 bits)."""
    table = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), device=codes.device)
    return table[codes.long() & 0xF]


@FORMATS.register("mxfp4")
class MXFP4Format(WeightFormat):
    """OCP MXFP4: E2M1 elements, blocks of 32 along the input dim, E8M0 shared scale.

    Example:
        >>> MXFP4Format().quantize(torch.randn(4, 64)).bits_per_weight()
        4.25
    """

    code_bits: ClassVar[int] = 4

    type: Literal["mxfp4"] = "mxfp4"
    granularity: Granularity = PerGroup(size=32)

    @field_validator("granularity")
    @classmethod
    def _fixed_block(cls, g: Granularity) -> Granularity:
        return _require_block(g, 32, "mxfp4")

    def fit(self, w: torch.Tensor) -> Params:
        """Power-of-two scale per block of ``w`` (rows, n_groups, 32); 1 for an all-zero block."""
        amax = w.abs().amax(dim=-1, keepdim=True)  # (rows, n_groups, 1)
        exp = torch.frexp(amax).exponent - 1 - _E2M1_EMAX  # floor(log2(amax)) - 2
        exp = torch.where(amax > 0, exp, 0).clamp(-127, 127)
        return {"scale": _e8m0_value(exp + 127)}

    def encode(self, w: torch.Tensor, params: Params) -> torch.Tensor:
        """E2M1 codes of ``w / X`` (values beyond ±6 clamp to ±6)."""
        return encode_e2m1(w / params["scale"])

    def decode(self, codes: torch.Tensor, params: Params) -> torch.Tensor:
        """``e2m1(codes) * X`` as float32."""
        return decode_e2m1(codes) * params["scale"].to(torch.float32)

    def store_params(self, params: Params) -> Params:
        """E8M0 scale as its biased exponent, uint8 (rows, n_groups)."""
        exp = torch.frexp(params["scale"].squeeze(-1)).exponent - 1  # exact: scale is 2**k
        return {"scale": (exp + 127).clamp(0, 254).to(torch.uint8)}

    def load_params(self, stored: Params) -> Params:
        """float32 ``2**(e - 127)`` (rows, n_groups, 1); code 255 is NaN per the spec."""
        return {"scale": _e8m0_value(stored["scale"]).unsqueeze(-1)}


@FORMATS.register("nvfp4")
class NVFP4Format(WeightFormat):
    """NVIDIA NVFP4: E2M1 elements, blocks of 16, FP8 E4M3 block scale times an fp32 global scale.

    Example:
        >>> NVFP4Format().quantize(torch.randn(4, 64)).bits_per_weight()
        4.625
    """

    code_bits: ClassVar[int] = 4

    type: Literal["nvfp4"] = "nvfp4"
    granularity: Granularity = PerGroup(size=16)

    @field_validator("granularity")
    @classmethod
    def _fixed_block(cls, g: Granularity) -> Granularity:
        return _require_block(g, 16, "nvfp4")

    @property
    def tensor_wide(self) -> bool:
        """The fp32 global scale spans the tensor."""
        return True

    def fit_tensor(self, w: torch.Tensor) -> Params:
        """The fp32 global scale of the whole ``w`` (rows, n_groups, 16): block scales fit E4M3 under it."""
        g = w.abs().amax() / (448.0 * E2M1_MAX)
        return {"global_scale": torch.where(g > 0, g, torch.ones_like(g)).reshape(1).to(torch.float32)}

    def fit_groups(self, w: torch.Tensor, tensor: Params, first_group: int = 0) -> Params:
        """E4M3 block scales of ``w`` (rows, k, 16) under the fixed global scale (clamped to E4M3's
        largest value when a group grew past the tensor's original range)."""
        g = tensor["global_scale"].reshape(1, 1, 1)
        block = (w.abs().amax(dim=-1, keepdim=True) / E2M1_MAX / g).clamp_max(448.0)  # (rows, k, 1)
        return {"scale": decode_fp8(encode_fp8(block, "e4m3"), "e4m3"), "global_scale": g}

    def store(self, params: Params, tensor: Params) -> Params:
        return {"scale": encode_fp8(params["scale"].squeeze(-1), "e4m3"), "global_scale": tensor["global_scale"]}

    def fit(self, w: torch.Tensor) -> Params:
        """Global scale from the whole ``w`` (rows, n_groups, 16) and E4M3 block scales under it."""
        return self.fit_groups(w, self.fit_tensor(w))

    def encode(self, w: torch.Tensor, params: Params) -> torch.Tensor:
        """E2M1 codes of ``w / (block_scale * global_scale)``."""
        return encode_e2m1(w / _nonzero(self._effective(params)))

    def decode(self, codes: torch.Tensor, params: Params) -> torch.Tensor:
        """``e2m1(codes) * block_scale * global_scale`` as float32."""
        return decode_e2m1(codes) * self._effective(params)

    def store_params(self, params: Params) -> Params:
        """Block scale as E4M3 bits, uint8 (rows, n_groups); global scale fp32 (1,)."""
        return {
            "scale": encode_fp8(params["scale"].squeeze(-1), "e4m3"),
            "global_scale": params["global_scale"].reshape(1).to(torch.float32),
        }

    def load_params(self, stored: Params) -> Params:
        """Block scale (rows, n_groups, 1) and global scale (1, 1, 1), float32."""
        return {
            "scale": decode_fp8(stored["scale"], "e4m3").unsqueeze(-1),
            "global_scale": stored["global_scale"].to(torch.float32).reshape(1, 1, 1),
        }

    @staticmethod
    def _effective(params: Params) -> torch.Tensor:
        return params["scale"].to(torch.float32) * params["global_scale"].to(torch.float32)


def _e8m0_value(e: torch.Tensor) -> torch.Tensor:
    """float32 ``2**(e - 127)`` for biased exponents ``e`` in [0, 255] (255: NaN), built from bits.

    Bits rather than ``exp2`` because 2**-127 is a float32 subnormal and must come out exact.
    """
    e = e.to(torch.int32)
    bits = torch.where(e > 0, e << 23, torch.full_like(e, 0x00400000))  # e == 0: 2**-127
    bits = torch.where(e == 255, torch.full_like(e, 0x7FC00000), bits)
    return bits.view(torch.float32)


def _require_block(g: Granularity, size: int, name: str) -> Granularity:
    """The block size is part of these formats' definition (and of every kernel for them)."""
    if not (isinstance(g, PerGroup) and g.size == size):
        raise ValueError(f"{name} uses blocks of exactly {size} (granularity {size}), got {g!r}")
    return g


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    """Zeros replaced by 1, so an all-zero block divides to 0 instead of NaN."""
    return torch.where(scale == 0, torch.ones_like(scale), scale)
