"""LLM.int8() as a data-free recipe stage: every selected linear becomes an ``Int8OutlierLinear``."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from ....models.loading import LoadedModel
from ....core.method import METHODS, MethodConfig, MethodEntry, RunContext
from ....models.selection import layer_weight, select_layers
from ...activation import install_int8, record_int8
from .llm_int8 import Int8OutlierLinear, LLMInt8Spec


class LLMInt8Config(MethodConfig):
    """LLM.int8(): int8 vector-wise matmul with float outlier columns decided per batch.

    Example:
        >>> LLMInt8Config(threshold=4.0).threshold
        4.0
    """

    method: Literal["llm-int8"] = "llm-int8"
    threshold: float = Field(6.0, gt=0, description="|x| above which a feature column is computed in float")


def run_llm_int8(lm: LoadedModel, cfg: LLMInt8Config, ctx: RunContext) -> None:
    """Replace every selected linear in place (data-free: outliers are found at run time)."""
    spec = LLMInt8Spec(threshold=cfg.threshold)
    for name, module in ctx.iterate(select_layers(lm, cfg), "LLM.int8()"):
        if getattr(module, "is_compressed_linear", False):
            ctx.warn(f"{name}: already compressed; left as is")
            continue
        w = layer_weight(name, module)  # (out, in)
        new = install_int8(lm.module, name, Int8OutlierLinear.from_linear(module, spec))
        record_int8(ctx, "llm-int8", name, w, new)


METHODS.register("llm-int8")(MethodEntry(
    LLMInt8Config, run_llm_int8,
    summary="LLM.int8(): int8 weights and per-token int8 activations, outlier columns in float (data-free)"))
