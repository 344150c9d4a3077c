"""HQQ as a recipe stage: data-free, layer by layer; the zero-point solver is in ``hqq.py``."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator

from ....core.method import METHODS, MethodConfig, MethodEntry, RunContext
from ....models.loading import LoadedModel
from ....models.selection import layer_weight, select_layers
from ...apply import install_quantized, record_quantized
from ...fields import FormatField
from ...formats.base import Params, QTensor
from ...formats.int_fz import FloatZeroIntFormat
from ...granularity import PerGroup, group_layout
from .hqq import hqq_zero


class HQQConfig(MethodConfig):
    """HQQ (Badri & Shaji, 2023): min-max scale, zero point by half-quadratic splitting; no data.

    The defaults are the reference's (``lp_norm`` 0.7, ``beta`` 10, ``kappa`` 1.01, at most 20
    iterations, starting from the rounded min-max zero point).
    HQQ moves the zero point off the integers, so it takes only formats that store a float zero
    (``type: int_fz``); any other format is refused when the recipe is loaded.

    Example:
        >>> HQQConfig(format={"type": "int_fz", "bits": 3, "granularity": 64}).format.qmax
        7
    """

    method: Literal["hqq"] = "hqq"
    format: FormatField = FloatZeroIntFormat(bits=4, granularity=PerGroup(size=64))
    lp_norm: float = Field(0.7, gt=0, le=1, description="p of the sparsity-promoting error ||W - W_r||_p^p")
    beta: float = Field(10.0, gt=0, description="initial half-quadratic penalty")
    kappa: float = Field(1.01, ge=1, description="factor by which beta grows every iteration")
    iters: int = Field(20, ge=0, le=1000, description="most solver iterations (0: the start alone)")

    @field_validator("format")
    @classmethod
    def _float_zero(cls, v: object) -> object:
        if not isinstance(v, FloatZeroIntFormat):
            raise ValueError("hqq optimises a fractional zero point, so it needs a format that stores a float "
                             f"zero (type int_fz); got type {getattr(v, 'type', v)!r}")
        return v


def hqq_quantize(w: torch.Tensor, cfg: HQQConfig) -> QTensor:
    """HQQ-quantise one (out, in) weight: min-max scale and rounded zero, then every group's zero solved.

    A short last group (``in`` not a multiple of the group size) is solved on its real columns alone:
    the padding ``fmt.grouped`` adds repeats the last column, which would weigh it that many times
    more in the zero update.
    """
    fmt: FloatZeroIntFormat = cfg.format  # type: ignore[assignment]
    wg = fmt.grouped(w)  # (rows, n_groups, G)
    n, last = group_layout(w.shape[1], fmt.group_size(w.shape[1]))
    short = isinstance(fmt.granularity, PerGroup) and last < wg.shape[-1]
    parts = [wg[:, : n - 1], wg[:, n - 1:, :last]] if short else [wg]
    solved = [_solve(part, fmt, cfg) for part in parts if part.shape[1]]
    params = {k: torch.cat([s[k] for s in solved], dim=1) for k in ("scale", "zero")}
    return fmt.quantize(w, params)


def _solve(wg: torch.Tensor, fmt: FloatZeroIntFormat, cfg: HQQConfig) -> Params:
    start = _start(wg, fmt)
    zero = hqq_zero(wg, start, fmt, p=cfg.lp_norm, beta=cfg.beta, kappa=cfg.kappa, iters=cfg.iters)
    return {"scale": start["scale"], "zero": zero}


def _start(wg: torch.Tensor, fmt: FloatZeroIntFormat) -> Params:
    """The reference's start: the min-max scale and its zero point rounded to an integer (wg: (rows,
    n_groups, G)); a group the min-max grid represents exactly (an already quantised weight) keeps it.

    The solver is a local search and the start decides where it ends: the rounded zero puts 0 on the
    grid, where most of a group's weights sit. On SmolLM2-135M (WikiText-2, 2,048 tokens, float PPL
    20.45) W3 g64 reaches PPL 68.1 from the rounded zero and 210 from the fractional one; W4 g64 24.5
    and 25.2.
    """
    fitted = fmt.fit(wg)
    rounded = {"scale": fitted["scale"], "zero": fmt.store_zero(torch.round(fitted["zero"]))}
    exact = (fmt.decode(fmt.encode(wg, fitted), fitted) == wg).all(dim=-1, keepdim=True)
    return {"scale": fitted["scale"], "zero": torch.where(exact, fitted["zero"], rounded["zero"])}


def run_hqq(lm: LoadedModel, cfg: HQQConfig, ctx: RunContext) -> None:
    """Quantise every selected layer in place (data-free)."""
    for name, module in ctx.iterate(select_layers(lm, cfg), "HQQ"):
        w = layer_weight(name, module)  # (out, in)
        qt = hqq_quantize(w, cfg)
        install_quantized(lm.module, name, module, qt)
        record_quantized(ctx, "hqq", name, w, qt)


METHODS.register("hqq")(MethodEntry(HQQConfig, run_hqq,
                                    summary="HQQ: half-quadratic zero points on a float-zero grid (data-free)"))
