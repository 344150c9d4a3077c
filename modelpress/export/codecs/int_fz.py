"""Export codecs of the float-zero integer format (``int_fz``, HQQ's): what each target can hold of it.

Our layer: codes ``c`` in ``0 .. 2**b - 1`` and per group a float ``scale`` and ``zero``,
``w = (c - zero) * scale`` (:mod:`modelpress.quant.formats.int_fz`).

* **compressed-tensors: ``naive-quantized``**, int ``b`` bits, asymmetric, ``zp_dtype`` float32.
  ``pack-quantized`` cannot hold it: compressed-tensors 0.20's ``PackedQuantizationCompressor``
  always unpacks ``weight_zero_point`` from ``b``-bit integers packed in int32 words, whatever
  ``QuantizationArgs.zp_dtype`` says. ``naive-quantized`` stores ``weight`` as int8 (one byte per
  code, not packed) and keeps ``weight_zero_point`` as the tensor it is given; the library's own
  decompressor computes ``(weight - weight_zero_point) * weight_scale`` in the scale's dtype. With
  the library's signed codes ``c - 2**(b-1)``, a float32 zero point ``zero - 2**(b-1)`` and a
  float32 scale that is our float32 arithmetic, bit for bit, whenever ``zero - 2**(b-1)`` is exact
  in float32 (every float16 zero of magnitude >= 2**-6, and 0); otherwise the two differ by at most
  one float32 rounding of ``c - zero``. Groups must tile the row (as for every compressed-tensors
  format). ``transformers`` loads it (decompressing on load) with our logits exactly; vLLM has no
  weight-only ``naive-quantized`` scheme for it (not tried here).
* **GGUF: ``Q4_1``** (``w = d * q + m`` per 32 values, ``d`` and ``m`` float16) holds codes of up to
  4 bits per channel or in groups of a multiple of 32 with float16-exact scales: ``d = scale`` and
  ``m = -zero * scale``, which is exact in float32 but rounded to float16 in the file. The carry-over
  reports the largest ``|Δw|`` between what GGUF's dequantiser gives and our weight (0 when every
  ``m`` is float16-exact). ``Q4_0`` / ``Q8_0`` (no offset) and the K-quants (6-bit sub-block scales)
  cannot hold a float zero point: the writer refuses those layers, naming each.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ...quant.formats.base import QTensor, WeightFormat
from ...quant.formats.int_fz import FloatZeroIntFormat
from ...quant.granularity import PerChannel, PerGroup, PerTensor
from .compressed_tensors import CT_CODECS, CTCodec, _scale_shape, _strategy
from .gguf_blocks import GGUF_CARRY, QK, _fp16_bytes, _fp16_exact, _nibbles


@CT_CODECS.register("int_fz")
class FloatZeroNaiveCodec(CTCodec):
    """``int_fz`` -> compressed-tensors ``naive-quantized`` with a float32 zero point (see module docstring)."""

    compression_format = "naive-quantized"

    def weight_args(self, fmt: WeightFormat, shape: tuple[int, int]) -> dict[str, Any]:
        return {"num_bits": fmt.bits, "type": "int", "symmetric": False, **_strategy(fmt, shape[1]),  # type: ignore[attr-defined]
                "dynamic": False, "zp_dtype": "torch.float32"}

    def encode(self, qt: QTensor) -> dict[str, torch.Tensor]:
        fmt, out_f = qt.fmt, qt.shape[0]
        mid = 1 << (fmt.bits - 1)  # type: ignore[attr-defined]
        scale, zero = (_scale_shape(fmt, qt.params[k], out_f).to(torch.float32) for k in ("scale", "zero"))
        return {"weight": (qt.codes.to(torch.int16) - mid).to(torch.int8).contiguous(),
                "weight_scale": scale.contiguous(), "weight_zero_point": (zero - mid).contiguous()}


def q4_1_from_int_fz(qt: QTensor) -> tuple[np.ndarray, float] | None:
    """GGUF ``Q4_1`` bytes of an ``int_fz`` layer and the largest ``|Δw|`` of rounding ``m`` to
    float16, or None when its codes, groups or scales do not fit (see module docstring)."""
    fmt, (out_f, in_f) = qt.fmt, qt.shape
    assert isinstance(fmt, FloatZeroIntFormat)
    p = _block_params(qt)
    if p is None or fmt.bits > 4 or not _fp16_exact(p["scale"]):
        return None
    d = p["scale"].to(torch.float32)  # (out, n_blocks)
    m = -p["zero"].to(torch.float32) * d
    d16, m16 = d.to(torch.float16), m.to(torch.float16)
    codes = qt.codes.reshape(out_f, -1, QK)  # (out, n_blocks, 32)
    theirs = d16.float().unsqueeze(-1) * codes.to(torch.float32) + m16.float().unsqueeze(-1)  # GGUF's d * q + m
    err = float((theirs.reshape(out_f, in_f) - qt.dequantize()).abs().max()) if qt.codes.numel() else 0.0
    blocks = np.concatenate([_fp16_bytes(d16.numpy().reshape(-1)), _fp16_bytes(m16.numpy().reshape(-1)),
                             _nibbles(qt.codes.numpy().reshape(-1, QK))], axis=1)
    return blocks.reshape(out_f, -1), err


def _block_params(qt: QTensor) -> dict[str, torch.Tensor] | None:
    """``scale`` and ``zero`` per 32-value block (out, in / 32), when the groups are whole blocks."""
    g, (out_f, in_f) = qt.fmt.granularity, qt.shape
    if in_f % QK or isinstance(g, PerTensor) or (isinstance(g, PerGroup) and g.size % QK):
        return None
    rep = in_f // QK if isinstance(g, PerChannel) else g.size // QK
    return {k: v.reshape(out_f, -1).repeat_interleave(rep, dim=1)[:, : in_f // QK] for k, v in qt.params.items()}


GGUF_CARRY.register("Q4_1:int_fz")(q4_1_from_int_fz)
