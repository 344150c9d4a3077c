"""HQQ: calibration-free half-quadratic optimisation of a float zero point (the maths is in ``hqq.py``)."""
from .hqq import hqq_zero, shrink_lp

__all__ = ["hqq_zero", "shrink_lp"]
