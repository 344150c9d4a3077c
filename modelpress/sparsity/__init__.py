"""Pruning and sparsity: patterns as types, masks that stay enforced, magnitude / Wanda / SparseGPT."""
