"""Structured pruning: whole attention heads, MLP neurons, decoder layers and Conv2d channels go,
so the matrices really shrink and the model runs (and reloads with ``transformers``) at its new size.

``shrink`` does the surgery, ``scores`` the importance maths, ``method`` the recipe stage
(``method: structured``), ``conv`` the Conv2d channel graph.
"""
from .conv import ConvPruneResult, find_conv_groups, prune_conv_channels
from .scores import BlockInfluence, heads_to_remove, neuron_scores, unit_scores
from .shrink import HeadLayout, head_layout, prune_heads, prune_neurons, remove_layers

__all__ = ["BlockInfluence", "ConvPruneResult", "HeadLayout", "find_conv_groups", "head_layout", "heads_to_remove",
           "neuron_scores", "prune_conv_channels", "prune_heads", "prune_neurons", "remove_layers", "unit_scores"]
