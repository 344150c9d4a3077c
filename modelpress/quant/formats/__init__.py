"""Weight formats. Importing this package registers every built-in format in ``FORMATS``.

Example:
    >>> from modelpress.quant.formats import format_from_dict
    >>> format_from_dict({"type": "int", "bits": 4, "granularity": 128})
    IntFormat(granularity=PerGroup(kind='group', size=128), type='int', bits=4, symmetric=True, mse_clip=False, scale_dtype='float16')
"""
from .base import FORMATS, QTensor, WeightFormat, format_from_dict
from .fp4 import MXFP4Format, NVFP4Format
from .fp8 import FP8Format
from .integer import IntFormat
from .nf4 import NF4Format

__all__ = [
    "FORMATS",
    "FP8Format",
    "IntFormat",
    "MXFP4Format",
    "NF4Format",
    "NVFP4Format",
    "QTensor",
    "WeightFormat",
    "format_from_dict",
]
