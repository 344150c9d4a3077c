"""Weight formats. Importing this package registers every built-in format in ``FORMATS``.

Example:
    >>> from modelpress.quant.formats import format_from_dict
    >>> fmt = format_from_dict({"type": "nf4", "granularity": 128})
    >>> fmt.to_dict()
    {'granularity': {'kind': 'group', 'size': 128}, 'type': 'nf4', 'double_quant': True}
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
