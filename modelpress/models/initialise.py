"""A seeded fresh random initialisation of a model, drawn from the model's own initialiser.

Training from scratch and the lottery ticket's random-reinitialisation control both need "this
architecture, new random weights": a Hugging Face model draws them from its ``_init_weights``
(Llama: linears and embeddings from N(0, ``initializer_range``), norms at one), a plain module from
each submodule's ``reset_parameters``. The draw depends only on the seed (the caller's random
state is left as it was), so two runs with the same seed start from the same weights.

Example:
    >>> model = random_init_(mp.load("stories260K.bin").module, seed=0)  # doctest: +SKIP
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["random_init_"]


@torch.no_grad()
def random_init_(model: nn.Module, seed: int) -> nn.Module:
    """Re-draw every parameter of ``model`` in place from its own initialiser, seeded.

    Args:
        model: a ``transformers`` model (its ``_init_weights`` is applied to every submodule) or a
            plain module (every submodule's ``reset_parameters()`` is called).
        seed: the draw's seed; the global random state is restored afterwards.
    Returns:
        ``model``, for chaining.
    Example:
        >>> m = random_init_(nn.Linear(4, 2), seed=1)
        >>> torch.equal(m.weight, random_init_(nn.Linear(4, 2), seed=1).weight)
        True
    """
    init = getattr(model, "_init_weights", None)
    with torch.random.fork_rng():  # CPU and any CUDA generators
        torch.manual_seed(seed)
        if callable(init):
            for p in model.parameters():
                # transformers marks weights read from a checkpoint and its init functions skip them
                p.__dict__.pop("_is_hf_initialized", None)
            model.apply(init)
        else:
            for m in model.modules():
                if callable(getattr(m, "reset_parameters", None)):
                    m.reset_parameters()
    return model
