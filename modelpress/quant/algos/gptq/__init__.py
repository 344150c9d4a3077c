"""GPTQ: Hessian-aware rounding with OBS error feedback (the pure maths lives in ``gptq.py``)."""
from .gptq import GPTQResult, gptq_quantize

__all__ = ["GPTQResult", "gptq_quantize"]
