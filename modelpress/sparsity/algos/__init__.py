"""Pruning algorithms: magnitude, Wanda, SparseGPT (each registers its recipe method)."""
