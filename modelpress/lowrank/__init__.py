"""Low-rank compression: factorised linears (``LowRankLinear``), the factorisation maths
(plain / activation-aware / truncation-aware SVD), rank rules, and low-rank compensation of
quantisation error (``CompensatedLinear``). The recipe stages register from ``method.py`` and
``compensate.py``."""
from .factor import Factors, scaled_factor, svd_factor, whitened_factor
from .layer import CompensatedLinear, LowRankLinear

__all__ = ["CompensatedLinear", "Factors", "LowRankLinear", "scaled_factor", "svd_factor", "whitened_factor"]
