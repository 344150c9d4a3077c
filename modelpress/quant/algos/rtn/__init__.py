"""Round-to-nearest weight quantisation: the data-free baseline every other method must beat."""
from .rtn import RTNConfig, run_rtn

__all__ = ["RTNConfig", "run_rtn"]
