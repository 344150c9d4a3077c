"""Uniform integer formats (int2 .. int8), symmetric or with an integer zero point.

Symmetric: ``code = clamp(round(w / scale), -2**(b-1), 2**(b-1) - 1) + 2**(b-1)``, decoded as
``(code - 2**(b-1)) * scale``. Asymmetric (GPTQ / AWQ style): the range ``[min(w, 0), max(w, 0)]`` is
split into ``2**b - 1`` steps, ``zero = round(-min / scale)`` is an integer stored as uint8, and
``code = clamp(round(w / scale) + zero, 0, 2**b - 1)``.

The scale is always rounded *up* to ``scale_dtype`` before use, so the stored grid still covers the
range and round-to-nearest error stays at most half a step of the stored scale.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import field_validator

from .base import FORMATS, Params, WeightFormat

_SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

#: Shrink factors tried by ``mse_clip`` (GPTQ's ``--mse``: grid 100, max shrink 0.8).
_MSE_SHRINKS = tuple(1.0 - i / 100 for i in range(80))


class IntegerGrid(WeightFormat):
    """What every ``bits``-wide integer code grid shares (the code width and its range); the
    zero point's type is the subclass's."""

    bits: int

    @field_validator("bits")
    @classmethod
    def _bits_in_range(cls, v: int) -> int:
        if not 2 <= v <= 8:
            raise ValueError(f"integer grids hold 2..8 bits, got {v}")
        return v

    @property
    def code_bits(self) -> int:  # type: ignore[override]
        """One code per value, ``bits`` wide (per instance, unlike fixed-width formats)."""
        return self.bits

    @property
    def qmax(self) -> int:
        """Largest code, ``2**bits - 1``."""
        return (1 << self.bits) - 1


@FORMATS.register("int")
class IntFormat(IntegerGrid):
    """Round-to-nearest integer grid with one scale (and zero point) per granularity unit.

    Fields:
        bits: code width, 2..8.
        symmetric: zero fixed at the grid centre (no zero point stored) or a uint8 zero point.
        mse_clip: search shrink factors of the range that minimise squared error per group
            (GPTQ ``--mse`` / AWQ clipping); off by default because it costs ~80 extra passes.
        scale_dtype: precision of the stored scale.

    The symmetric fit uses the extra negative level: ``scale = max(max(w) / (2**(b-1) - 0.5),
    -min(w) / 2**(b-1))``. When the positive side dominates this is exactly the GPTQ/torchao
    ``amax / ((2**b - 1) / 2)`` (the top value clips by at most half a step); when the negative side
    dominates the grid is finer and nothing clips.

    Re-quantising a dequantised weight is a no-op (exactly so for float16 and bfloat16 scales;
    float32 scales can move by an ulp): a group that a grid recovered from its range represents
    exactly keeps that grid, see ``_source_grids``.

    Example:
        >>> fmt = IntFormat(bits=4, granularity=128)
        >>> qt = fmt.quantize(torch.randn(8, 256))
        >>> qt.bits_per_weight()
        4.125
    """

    type: Literal["int"] = "int"
    symmetric: bool = True
    mse_clip: bool = False
    scale_dtype: Literal["float16", "bfloat16", "float32"] = "float16"

    @property
    def mid(self) -> int:
        """Code of zero in the symmetric grid, ``2**(bits-1)``."""
        return 1 << (self.bits - 1)

    # ---- contract ----------------------------------------------------------------------------
    def fit(self, w: torch.Tensor) -> Params:
        """Scale (and zero) per group of ``w`` (rows, n_groups, G), each (rows, n_groups, 1)."""
        p = self._minmax(w, 1.0)
        if self.mse_clip:
            p = self._mse_search(w, p)
        return self._prefer_exact(w, p, self._source_grids(w))

    def encode(self, w: torch.Tensor, params: Params) -> torch.Tensor:
        """uint8 codes (rows, n_groups, G); an all-zero group (scale 0) encodes to zero."""
        q = torch.round(w / _nonzero(params["scale"]))  # (rows, n_groups, G)
        if self.symmetric:
            return (q.clamp(-self.mid, self.mid - 1) + self.mid).to(torch.uint8)
        return (q + params["zero"].to(torch.float32)).clamp(0, self.qmax).to(torch.uint8)

    def decode(self, codes: torch.Tensor, params: Params) -> torch.Tensor:
        """Float32 values (rows, n_groups, G); scale 0 decodes to exactly 0."""
        zero = self.mid if self.symmetric else params["zero"].to(torch.float32)
        return (codes.to(torch.float32) - zero) * params["scale"].to(torch.float32)

    def store_params(self, params: Params) -> Params:
        """``scale`` in ``scale_dtype`` and, if asymmetric, ``zero`` as uint8, shape (rows, n_groups)."""
        out = {"scale": params["scale"].squeeze(-1).to(_SCALE_DTYPES[self.scale_dtype])}
        if not self.symmetric:
            out["zero"] = params["zero"].squeeze(-1).to(torch.uint8)
        return out

    # ---- fitting -----------------------------------------------------------------------------
    def _minmax(self, w: torch.Tensor, shrink: float) -> Params:
        """Min-max fit of the range shrunk by ``shrink`` (1.0: no clipping beyond half a step)."""
        lo, hi = _range(w)
        lo, hi = lo * shrink, hi * shrink
        if self.symmetric:
            scale = torch.maximum(hi / (self.mid - 0.5), -lo / self.mid)
            return {"scale": self._round_up(scale)}
        scale = self._round_up((hi - lo) / self.qmax)
        zero = torch.round(-lo / _nonzero(scale).double()).clamp(0, self.qmax)
        return {"scale": scale, "zero": zero.to(torch.float32)}

    def _mse_search(self, w: torch.Tensor, p: Params) -> Params:
        """Per group, the shrink factor of the range with the least squared error."""
        best_err = torch.full_like(p["scale"], float("inf"))  # (rows, n_groups, 1)
        best = dict(p)
        for shrink in _MSE_SHRINKS:
            cand = self._minmax(w, shrink)
            err = (self.decode(self.encode(w, cand), cand) - w).pow(2).sum(dim=-1, keepdim=True)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = {k: torch.where(better, cand[k], best[k]) for k in best}
        return best

    def _source_grids(self, w: torch.Tensor) -> list[Params]:
        """The grids ``w`` may have come from if it is an already dequantised weight.

        Dequantising leaves the range ends on (or, when the scale was rounded up, a code or two
        inside) the grid ends: symmetric ``(2**(b-1)-1) * s`` or ``-2**(b-1) * s``; asymmetric
        ``-zero * s`` and ``(2**b - 1 - zero) * s``. Recovering ``s`` from them makes
        re-quantisation return the same grid instead of a slightly different one.
        """
        lo, hi = _range(w)
        if self.symmetric:
            clip_free = torch.maximum(hi / (self.mid - 1), -lo / self.mid)
            scales = (clip_free, torch.maximum(hi, -lo) / (self.mid - 1))
            return [{"scale": self._round_up(sc)} for sc in scales]
        grids = []
        for width in (self.qmax, self.qmax - 1, self.qmax - 2):
            scale = self._round_up((hi - lo) / max(width, 1))
            zero = torch.round(-lo / _nonzero(scale).double()).clamp(0, self.qmax)
            grids.append({"scale": scale, "zero": zero.to(torch.float32)})
        return grids

    def _prefer_exact(self, w: torch.Tensor, p: Params, cands: list[Params]) -> Params:
        """The first candidate that represents a group exactly (zero error beats any fit), else ``p``."""
        for cand in reversed(cands):  # reversed: the first exact candidate is applied last
            exact = (self.decode(self.encode(w, cand), cand) == w).all(dim=-1, keepdim=True)
            p = {k: torch.where(exact, cand[k], p[k]) for k in p}
        return p

    def _round_up(self, scale: torch.Tensor) -> torch.Tensor:
        """Smallest ``scale_dtype`` value >= ``scale`` (float64 in), as float32.

        A scale beyond the dtype's range is clamped to its largest value (weights beyond about
        65504 * 2**(bits-1) need bfloat16 or float32 scales).

        Rounding to nearest could shrink the step and push the range end past the grid; rounding
        up keeps the half-step error bound true for the scale that is really stored.
        """
        dt = _SCALE_DTYPES[self.scale_dtype]
        scale = scale.clamp(max=torch.finfo(dt).max)
        s = scale.to(dt)
        s = torch.where(s.double() < scale, torch.nextafter(s, torch.full_like(s, float("inf"))), s)
        return s.to(torch.float32)


def _range(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(min(w, 0), max(w, 0)) per group of (rows, n_groups, G), each (rows, n_groups, 1), float64.

    float64 so that refitting a dequantised weight recomputes its stored scale exactly.
    """
    lo = w.amin(dim=-1, keepdim=True).clamp_max(0).double()
    hi = w.amax(dim=-1, keepdim=True).clamp_min(0).double()
    return lo, hi


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` with zeros replaced by 1, so an all-zero group divides to 0 instead of NaN."""
    return torch.where(scale == 0, torch.ones_like(scale), scale)
