"""LLM.int8(): vector-wise int8 with run-time outlier decomposition (maths and layer in ``llm_int8.py``)."""
from .llm_int8 import Int8OutlierLinear, LLMInt8Spec, llm_int8_matmul

__all__ = ["Int8OutlierLinear", "LLMInt8Spec", "llm_int8_matmul"]
