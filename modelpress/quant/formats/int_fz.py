"""Integer codes with a float zero point: HQQ's storage format, ``w = (code - zero) * scale``.

A group is stored as ``bits``-wide unsigned codes ``c`` plus a float ``scale`` and a float ``zero``
and decodes as ``(c - zero) * scale``. The zero point is *fractional*: the grid may sit anywhere
relative to 0, which is what HQQ's solver optimises (:mod:`modelpress.quant.algos.hqq`).

Why a format of its own rather than an option of :class:`~.integer.IntFormat`: what is stored differs
(a float zero where ``int`` stores a uint8), and the ``int`` code is written around an integer zero:
``IntFormat`` stores and re-fits it as one, the compressed-tensors ``pack-quantized`` codec packs it
into ``b``-bit integers, the int4/int8 kernels are tested only on integer zeros. As an option, every
``type: int`` consumer would have to check it, and one that did not would truncate the zero without
a word. As its own ``type`` each consumer refuses it until support is registered for ``int_fz``
(kernels fall back to the reference, writers name the layer and why; the export codecs live in
:mod:`modelpress.export.codecs.int_fz`), and no ``int`` code changes.
"""
from __future__ import annotations

from typing import Literal

import torch

from ..granularity import PerGroup, group_layout
from .base import FORMATS, Params
from .integer import IntegerGrid

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
FloatName = Literal["float16", "bfloat16", "float32"]

#: Widths (in steps) of the range a dequantised group may span, tried when re-fitting one: the full
#: grid and the grid one or two codes short at either end (see ``_source_grids``).
_SOURCE_SPANS = 3
#: A group whose values all lie within this fraction of a step of a uniform grid over its range may
#: be an already dequantised one (float rounding leaves ~1e-6; a group of real weights is far off).
_ON_GRID_TOL = 0.01


@FORMATS.register("int_fz")
class FloatZeroIntFormat(IntegerGrid):
    """Asymmetric integer grid whose zero point is a float: ``w = (code - zero) * scale``.

    Fields:
        bits: code width, 2..8.
        scale_dtype: precision of the stored scale (rounded *up*, so the fitted range stays covered).
        zero_dtype: precision of the stored zero point (rounded to nearest). float16 keeps a zero of
            up to 16 (4-bit codes) within 2**-8 of a step; 8-bit codes want float32.

    ``fit`` is min-max over the group's true range ``[min(w), max(w)]`` (HQQ's initialisation; the
    range need not contain 0, because the zero point need not be an integer). For the same reason a
    short last group (width not a multiple of the group size) is padded with copies of its last
    column rather than with zeros (see ``grouped``). Re-fitting an already dequantised weight
    returns its grid.

    Example:
        >>> fmt = FloatZeroIntFormat(bits=4, granularity=64)
        >>> qt = fmt.quantize(torch.randn(8, 256))
        >>> qt.bits_per_weight(), qt.params["zero"].dtype
        (4.5, torch.float16)
    """

    type: Literal["int_fz"] = "int_fz"
    scale_dtype: FloatName = "float16"
    zero_dtype: FloatName = "float16"

    @property
    def exact_zero(self) -> bool:
        """False: 0 is a grid point only when the zero point happens to be an integer, so pruned
        weights would not stay exactly 0 (an all-zero group still decodes to 0)."""
        return False

    # ---- contract ----------------------------------------------------------------------------
    def grouped(self, w: torch.Tensor) -> torch.Tensor:
        """View (out, in) as (rows, n_groups, G), a short last group padded by repeating its last column.

        The base pads with zeros, which is harmless where 0 is a grid point; here it is not, so zero
        padding would widen a group's range and could never be represented exactly.
        """
        g = self.granularity
        if isinstance(g, PerGroup) and w.shape[1] % g.size:
            n, _ = group_layout(w.shape[1], g.size)
            w = torch.cat([w, w[:, -1:].expand(-1, n * g.size - w.shape[1])], dim=1)
        return super().grouped(w)

    def fit(self, w: torch.Tensor) -> Params:
        """Min-max ``scale`` and float ``zero`` per group of ``w`` (rows, n_groups, G), in stored precision."""
        lo, hi = _true_range(w)
        p = self._grid(lo, (hi - lo) / self.qmax, torch.zeros_like(lo), round_up=True)
        maybe = self._maybe_dequantized(w, lo, hi)  # (rows, n_groups): worth checking for an exact grid
        if bool(maybe.any()):
            sub = self._prefer_exact(w[maybe].unsqueeze(1), {k: v[maybe].unsqueeze(1) for k, v in p.items()},
                                     self._source_grids(lo[maybe].unsqueeze(1), hi[maybe].unsqueeze(1)))
            for k in p:
                p[k][maybe] = sub[k].squeeze(1)
        return p

    def encode(self, w: torch.Tensor, params: Params) -> torch.Tensor:
        """uint8 codes ``clamp(round(w / scale + zero), 0, qmax)``, (rows, n_groups, G)."""
        q = torch.round(w / _nonzero(params["scale"]) + params["zero"])
        return q.clamp(0, self.qmax).to(torch.uint8)

    def decode(self, codes: torch.Tensor, params: Params) -> torch.Tensor:
        """Float32 ``(code - zero) * scale``; scale 0 (an all-zero group) decodes to exactly 0."""
        return (codes.to(torch.float32) - params["zero"].to(torch.float32)) * params["scale"].to(torch.float32)

    def store_params(self, params: Params) -> Params:
        """``scale`` in ``scale_dtype`` and ``zero`` in ``zero_dtype``, each (rows, n_groups)."""
        return {"scale": params["scale"].squeeze(-1).to(_DTYPES[self.scale_dtype]),
                "zero": params["zero"].squeeze(-1).to(_DTYPES[self.zero_dtype])}

    # ---- fitting -----------------------------------------------------------------------------
    def store_zero(self, zero: torch.Tensor) -> torch.Tensor:
        """``zero`` rounded to its stored precision (float32 out), for solvers that move it."""
        return zero.to(_DTYPES[self.zero_dtype]).to(torch.float32)

    def _grid(self, lo: torch.Tensor, step: torch.Tensor, low_code: torch.Tensor, round_up: bool) -> Params:
        """Scale ``step`` (rounded up, or to nearest) and the zero putting ``lo`` on code ``low_code``."""
        dt = _DTYPES[self.scale_dtype]
        step = step.clamp(max=torch.finfo(dt).max)
        s = step.to(dt)
        if round_up:  # a scale rounded down could push max(w) past the top code
            s = torch.where(s.double() < step, torch.nextafter(s, torch.full_like(s, float("inf"))), s)
        s = s.double()
        zero = low_code - lo / torch.where(s == 0, torch.ones_like(s), s)
        return {"scale": s.to(torch.float32), "zero": self.store_zero(zero)}

    def _maybe_dequantized(self, w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """(rows, n_groups) bool: the group's values sit on a uniform grid of one of the source spans."""
        span = hi - lo
        r = ((w - lo) / torch.where(span == 0, torch.ones_like(span), span)).to(torch.float32)  # (rows, n, G) in [0, 1]
        hit = torch.zeros(w.shape[:-1], dtype=torch.bool, device=w.device)
        for k in range(self.qmax, self.qmax - _SOURCE_SPANS, -1):
            d = r * max(k, 1)
            hit |= (d - torch.round(d)).abs().amax(dim=-1) < _ON_GRID_TOL
        return hit

    def _source_grids(self, lo: torch.Tensor, hi: torch.Tensor) -> list[Params]:
        """Grids a dequantised group may have come from: its range spans ``k`` steps (the full
        ``qmax`` or one or two fewer, when a solver moved the zero so that an end code went unused)
        starting at code ``c0``; scale and zero are recovered to nearest and checked for exactness."""
        grids = []
        for k in range(self.qmax, self.qmax - _SOURCE_SPANS, -1):
            for c0 in range(self.qmax - k + 1):
                grids.append(self._grid(lo, (hi - lo) / max(k, 1), torch.full_like(lo, float(c0)), round_up=False))
        return grids

    def _prefer_exact(self, w: torch.Tensor, p: Params, cands: list[Params]) -> Params:
        """Per group, the first candidate that represents it exactly (zero error beats any fit), else ``p``."""
        for cand in reversed(cands):  # reversed: the first exact candidate is applied last
            stored = self.roundtrip_params(cand)
            exact = (self.decode(self.encode(w, stored), stored) == w).all(dim=-1, keepdim=True)
            p = {k: torch.where(exact, stored[k], p[k]) for k in p}
        return p


def _true_range(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) per group of (rows, n_groups, G) as float64 (rows, n_groups, 1); a constant group
    is widened to include 0, so that only an all-zero group has an empty range (scale 0)."""
    lo = w.amin(dim=-1, keepdim=True).double()
    hi = w.amax(dim=-1, keepdim=True).double()
    flat = hi == lo
    return torch.where(flat, lo.clamp(max=0), lo), torch.where(flat, hi.clamp(min=0), hi)


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` with zeros replaced by 1, so an all-zero group divides to 0 instead of NaN."""
    return torch.where(scale == 0, torch.ones_like(scale), scale)
