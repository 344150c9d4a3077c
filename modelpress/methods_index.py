"""The one place that imports every method module so each registers itself."""
from .quant.algos import rtn  # noqa: F401
