"""INT8 PTQ (static and dynamic) for Linear and Conv2d layers of any model."""
from .ptq import dynamic_spec, quantizable_layers, to_int8

__all__ = ["dynamic_spec", "quantizable_layers", "to_int8"]
