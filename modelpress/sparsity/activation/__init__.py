"""Activation sparsity: TEAL magnitude thresholds and Deja Vu neuron predictors (wrappers + measured skipped work)."""
from .dejavu import DejaVuMLP, OracleActive, OracleTopK, PredictorTopK
from .flops import MacReport, measure_mlp
from .teal import ThresholdLinear, column_sparse_linear, magnitude_threshold

__all__ = ["DejaVuMLP", "MacReport", "OracleActive", "OracleTopK", "PredictorTopK", "ThresholdLinear",
           "column_sparse_linear", "magnitude_threshold", "measure_mlp"]
