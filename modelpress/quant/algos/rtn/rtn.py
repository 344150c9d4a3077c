"""RTN: each selected layer's weight is rounded to the nearest point of its format's grid."""
from __future__ import annotations

from typing import Literal

from ....models.loading import LoadedModel
from ....core.method import METHODS, MethodConfig, MethodEntry, RunContext
from ....models.selection import layer_weight, select_layers
from ...apply import install_quantized, record_quantized
from ...fields import FormatField
from ...formats import IntFormat


class RTNConfig(MethodConfig):
    """Round-to-nearest weight-only quantisation.

    Example:
        >>> RTNConfig(format={"type": "int", "bits": 4, "granularity": 128}).format.bits
        4
    """

    method: Literal["rtn"] = "rtn"
    format: FormatField = IntFormat(bits=8)


def run_rtn(lm: LoadedModel, cfg: RTNConfig, ctx: RunContext) -> None:
    """Quantise every selected layer in place (data-free)."""
    for name, module in ctx.iterate(select_layers(lm, cfg), "RTN"):
        w = layer_weight(name, module)  # (out, in)
        qt = cfg.format.quantize(w)
        install_quantized(lm.module, name, module, qt)
        record_quantized(ctx, "rtn", name, w, qt)


METHODS.register("rtn")(MethodEntry(RTNConfig, run_rtn, summary="round-to-nearest weight quantisation (data-free)"))
