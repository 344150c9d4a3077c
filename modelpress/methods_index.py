"""The one place that imports every method module so each registers itself."""
from .quant.algos import rtn  # noqa: F401
from .quant.algos.gptq import method as _gptq_method  # noqa: F401
