"""NF4 (4-bit NormalFloat, QLoRA) with optional double quantisation of the absmax.

Values are ``NF4_VALUES[code] * absmax`` per block (default 64 weights), the code being the
nearest of the 16 published levels to ``w / absmax``. With ``double_quant`` the fp32 absmax values
are stored the way bitsandbytes does it (``quantize_4bit(..., compress_statistics=True)``):
subtract their mean, then quantise blocks of 256 with the bitsandbytes *dynamic* 8-bit map
(``create_dynamic_map(signed=True)``, reproduced below) and one fp32 absmax per block of 256.
"""
from __future__ import annotations

from functools import lru_cache
from typing import ClassVar, Literal

import torch

from ..granularity import Granularity, PerGroup
from .base import FORMATS, Params, WeightFormat

#: The 16 NF4 levels exactly as published by bitsandbytes (QLoRA, Dettmers et al. 2023).
NF4_VALUES: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

#: Absmax values per second-level block (bitsandbytes' fixed choice).
DQ_BLOCK = 256


@FORMATS.register("nf4")
class NF4Format(WeightFormat):
    """4-bit NormalFloat with blockwise absmax scaling.

    Fields:
        granularity: absmax block, default ``PerGroup(64)`` as in QLoRA.
        double_quant: store the absmax as 8-bit dynamic-map codes (one fp32 scale per 256 blocks
            plus one fp32 offset) instead of fp32: 4.127 instead of 4.5 bits per weight at block 64.

    Example:
        >>> qt = NF4Format().quantize(torch.randn(64, 4096))
        >>> round(qt.bits_per_weight(), 3)
        4.127
    """

    code_bits: ClassVar[int] = 4
    scale_linear: ClassVar[bool] = False  # its parameter is "absmax", not a learnable "scale"

    type: Literal["nf4"] = "nf4"
    granularity: Granularity = PerGroup(size=64)
    double_quant: bool = True

    def fit(self, w: torch.Tensor) -> Params:
        """Absmax per block of ``w`` (rows, n_groups, G) -> {"absmax": (rows, n_groups, 1)}."""
        return {"absmax": w.abs().amax(dim=-1, keepdim=True)}

    def encode(self, w: torch.Tensor, params: Params) -> torch.Tensor:
        """Index of the nearest NF4 level to ``w / absmax`` (ties go to the lower level)."""
        x = w / _nonzero(params["absmax"])  # (rows, n_groups, G), in [-1, 1]
        return _nearest(x, _nf4_table(w.device)).to(torch.uint8)

    def decode(self, codes: torch.Tensor, params: Params) -> torch.Tensor:
        """``NF4_VALUES[codes] * absmax`` as float32."""
        return _nf4_table(codes.device)[codes.long()] * params["absmax"].to(torch.float32)

    @property
    def tensor_wide(self) -> bool:
        """Double quantisation's offset and second-level scales span the tensor."""
        return self.double_quant

    def fit_tensor(self, w: torch.Tensor) -> Params:
        """Double quantisation's statistics of the absmax of ``w`` (rows, n_groups, G): the offset
        (their mean) and one scale per 256 centred values; none without double quantisation."""
        if not self.double_quant:
            return {}
        absmax = w.abs().amax(dim=-1).to(torch.float32)  # (rows, n_groups)
        offset = absmax.mean().reshape(1)
        scale2 = _blocks_of(absmax.reshape(-1) - offset).abs().amax(dim=-1)  # (n_blocks,)
        return {"absmax_scale": scale2, "absmax_offset": offset, "n_groups": torch.tensor([absmax.shape[1]])}

    def fit_groups(self, w: torch.Tensor, tensor: Params, first_group: int = 0) -> Params:
        """Absmax of groups ``first_group ..`` rounded through the fixed double-quantisation statistics
        (the value stored, so a later store gives these exact values back)."""
        absmax = w.abs().amax(dim=-1, keepdim=True)  # (rows, k, 1)
        if not self.double_quant:
            return {"absmax": absmax}
        q = _dq_codes(absmax.squeeze(-1), tensor, first_group)
        return {"absmax": _dq_values(q, tensor, first_group).unsqueeze(-1)}

    def store(self, params: Params, tensor: Params) -> Params:
        """Double-quantised with the statistics fitted up front (not re-fitted on ``params``)."""
        if not self.double_quant:
            return self.store_params(params)
        q = _dq_codes(params["absmax"].squeeze(-1).to(torch.float32), tensor, 0)
        return {"absmax_q": q, "absmax_scale": tensor["absmax_scale"], "absmax_offset": tensor["absmax_offset"]}

    def store_params(self, params: Params) -> Params:
        """fp32 absmax (rows, n_groups), or its double-quantised form (see module docstring)."""
        absmax = params["absmax"].squeeze(-1).to(torch.float32)  # (rows, n_groups)
        if not self.double_quant:
            return {"absmax": absmax}
        return double_quantize(absmax)

    def load_params(self, stored: Params) -> Params:
        """Float32 absmax (rows, n_groups, 1), undoing the double quantisation if used."""
        if not self.double_quant:
            return {"absmax": stored["absmax"].to(torch.float32).unsqueeze(-1)}
        return {"absmax": double_dequantize(stored).unsqueeze(-1)}


# ---- double quantisation of the absmax ---------------------------------------------------------
def double_quantize(absmax: torch.Tensor) -> Params:
    """bitsandbytes-style compression of fp32 absmax values (rows, n_groups).

    Returns:
        ``absmax_q`` uint8 (rows, n_groups): dynamic-map codes of ``absmax - offset``;
        ``absmax_scale`` fp32 (ceil(N / 256),): absmax of each block of 256 centred values;
        ``absmax_offset`` fp32 (1,): the mean that was subtracted.
    """
    offset = absmax.mean().reshape(1)  # (1,)
    blocks = _blocks_of(absmax.reshape(-1) - offset)  # (n_blocks, 256)
    scale2 = blocks.abs().amax(dim=-1)  # (n_blocks,)
    q = _nearest(blocks / _nonzero(scale2).unsqueeze(-1), dynamic_map(absmax.device))
    q = q.reshape(-1)[: absmax.numel()].reshape(absmax.shape).to(torch.uint8)
    return {"absmax_q": q, "absmax_scale": scale2, "absmax_offset": offset}


def double_dequantize(stored: Params) -> torch.Tensor:
    """Float32 absmax (rows, n_groups) from :func:`double_quantize` output.

    Clamped at zero: a tiny absmax far below the mean can come back slightly negative, which would
    flip the sign of its block; zero decodes that block to zeros instead.
    """
    q = stored["absmax_q"]  # (rows, n_groups)
    code = dynamic_map(q.device)[_blocks_of(q.reshape(-1)).long()]  # (n_blocks, 256)
    vals = code * stored["absmax_scale"].to(torch.float32).unsqueeze(-1) + stored["absmax_offset"].float()
    return vals.reshape(-1)[: q.numel()].reshape(q.shape).clamp_min(0)


def _dq_index(shape: tuple[int, int], tensor: Params, first_group: int, device: torch.device) -> torch.Tensor:
    """Second-level block of each absmax (rows, k) of groups ``first_group ..`` in the row-major
    (rows, n_groups) order double quantisation flattens them in."""
    rows, k = shape
    n_groups = int(tensor["n_groups"])
    flat = torch.arange(rows, device=device).unsqueeze(1) * n_groups + first_group + torch.arange(k, device=device)
    return flat // DQ_BLOCK  # (rows, k)


def _dq_codes(absmax: torch.Tensor, tensor: Params, first_group: int) -> torch.Tensor:
    """uint8 dynamic-map codes of ``absmax`` (rows, k) under the fixed offset and block scales."""
    blk = _dq_index(tuple(absmax.shape), tensor, first_group, absmax.device)
    scale2 = tensor["absmax_scale"].to(absmax.device)[blk]
    return _nearest((absmax - tensor["absmax_offset"]) / _nonzero(scale2), dynamic_map(absmax.device)).to(torch.uint8)


def _dq_values(q: torch.Tensor, tensor: Params, first_group: int) -> torch.Tensor:
    """Float32 absmax (rows, k) of codes ``q`` (clamped at zero, as :func:`double_dequantize`)."""
    blk = _dq_index(tuple(q.shape), tensor, first_group, q.device)
    vals = dynamic_map(q.device)[q.long()] * tensor["absmax_scale"].to(q.device)[blk] + tensor["absmax_offset"]
    return vals.clamp_min(0)


@lru_cache(maxsize=None)
def _dynamic_map_cpu() -> torch.Tensor:
    """bitsandbytes ``create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)``.

    A sign bit, a unary-coded decimal exponent 10**-6 .. 10**0 and the remaining bits as a linear
    fraction in [0.1, 1]; plus 0 and 1.0. Written in the same torch float32 operations as the
    original so the 256 values are bit-identical.
    """
    data: list[float] = []
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2**i + 1)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256 sorted values of the bitsandbytes signed dynamic 8-bit map (float32)."""
    return _dynamic_map_cpu().to(device)


# ---- helpers -----------------------------------------------------------------------------------
def _nf4_table(device: torch.device) -> torch.Tensor:
    return torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)


def _nearest(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index into sorted ``table`` of the nearest value to each ``x`` (ties to the lower index)."""
    mids = (table[:-1] + table[1:]) / 2  # (len - 1,)
    return torch.bucketize(x.contiguous(), mids)


def _blocks_of(flat: torch.Tensor) -> torch.Tensor:
    """1-D (N,) zero padded and viewed as (ceil(N / 256), 256)."""
    pad = (-flat.numel()) % DQ_BLOCK
    return torch.nn.functional.pad(flat, (0, pad)).reshape(-1, DQ_BLOCK)


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    """Zeros replaced by 1, so an all-zero block divides to 0 instead of NaN."""
    return torch.where(scale == 0, torch.ones_like(scale), scale)
