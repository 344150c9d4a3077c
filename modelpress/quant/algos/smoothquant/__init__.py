"""SmoothQuant: smoothing factors folded into norms and linears, then W8A8 (maths in ``smoothquant.py``)."""
from .smoothquant import fold_smoothing, smoothing_factors

__all__ = ["fold_smoothing", "smoothing_factors"]
