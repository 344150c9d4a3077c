"""AWQ: activation-aware per-channel scaling and clipping (the pure maths lives in ``awq.py``)."""
from .awq import (
    ScaleSearch,
    candidate_scales,
    clip_plan,
    fold_into_linear_out,
    fold_into_norm,
    quantize_clipped,
    scale_linear_in,
    scaled_output_error,
    search_clip,
    search_scales,
    token_basis,
)

__all__ = [
    "ScaleSearch",
    "candidate_scales",
    "clip_plan",
    "fold_into_linear_out",
    "fold_into_norm",
    "quantize_clipped",
    "scale_linear_in",
    "scaled_output_error",
    "search_clip",
    "search_scales",
    "token_basis",
]
