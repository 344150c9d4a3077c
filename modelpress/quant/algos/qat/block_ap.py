"""Block-AP (EfficientQAT, Chen et al. 2024): train one block's weights and quantisation grids so its
output matches the float block's. Tensors and one block in, the trained block out; no model plumbing.

For one decoder block with its linears already swapped for fake-quantised layers, minimise

    L = || block_q(X_q) - Y_float ||^2 / numel          (X_q: the compressed stream into the block,
                                                         Y_float: the float block on the float stream)

(trained on ``L / mean(Y_float^2)``: the same minimiser, but a block whose activations are small
would otherwise have gradients below AdamW's ``eps`` and not move) with AdamW over ``epochs`` passes of the cached calibration sequences, weights and grid parameters in
their own parameter groups (EfficientQAT's ``weight_lr`` and ``quant_lr``), both on a cosine schedule
to zero. BRECQ and OmniQuant reconstruct the same target; EfficientQAT trains all of the block's
weights as well as the step sizes, which is what this does.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn


@dataclass
class BlockFit:
    """What one block's reconstruction did: its output MSE before and after, and its cost."""

    mse_before: float
    mse_after: float
    steps: int
    tokens: int
    cpu_s: float
    losses: list[float] = field(default_factory=list)  # mean training loss per epoch
    #: training ended with a higher output MSE than it started from, so the starting parameters were put
    #: back (the MSE the training reached); None when training helped
    reverted_from: float | None = None


def block_output(block: nn.Module, x: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """``block(x, **kwargs)``'s hidden states (the first item when the block returns a tuple)."""
    out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def block_mse(block: nn.Module, x: torch.Tensor, y: torch.Tensor, kwargs: dict[str, Any], batch_size: int) -> float:
    """Mean squared error of the block's outputs on ``x`` (n, seq, hidden) against ``y``."""
    total = 0.0
    for s in range(0, x.shape[0], batch_size):
        total += float((block_output(block, x[s:s + batch_size], kwargs) - y[s:s + batch_size]).double().pow(2).sum())
    return total / y.numel()


def reconstruct(block: nn.Module, groups: list[dict[str, Any]], x: torch.Tensor, y: torch.Tensor,
                kwargs: dict[str, Any], *, epochs: int, batch_size: int, weight_decay: float = 0.0,
                seed: int = 0) -> BlockFit:
    """Train the parameters in ``groups`` (AdamW param groups with their ``lr``) to match ``y``.

    Args:
        block: the block, its linears fake-quantised; only the parameters in ``groups`` should
            require gradients (the caller freezes the rest).
        groups: AdamW parameter groups, e.g. ``[{"params": weights, "lr": 2e-5}, {"params": scales, "lr": 1e-4}]``.
        x: (n, seq, hidden) block inputs on the compressed stream; y: (n, seq, hidden) float targets.
        kwargs: what the block receives beside the hidden states (masks, rotary tables), broadcast over the batch.
        epochs, batch_size: passes over the ``n`` sequences and sequences per optimizer step (the last
            partial batch of an epoch is dropped, so every step sees ``batch_size`` sequences).
        seed: the shuffling seed (the order is a pure function of it, so a rerun trains identically).

    Returns:
        :class:`BlockFit` (the MSE is measured on the same ``n`` sequences before and after). Training
        never leaves the block worse than it found it: when the final MSE is above the starting one
        (Adam's steps are absolute, so on a grid much finer than the learning rate they only add
        noise), the starting parameters are restored and ``reverted_from`` says what training reached.

    Example:
        >>> blk = nn.Linear(4, 4)
        >>> x = torch.randn(8, 3, 4); y = x @ torch.eye(4)
        >>> fit = reconstruct(blk, [{"params": list(blk.parameters()), "lr": 0.05}], x, y, {}, epochs=20, batch_size=2)
        >>> fit.mse_after < fit.mse_before
        True
    """
    c0 = time.process_time()
    n = x.shape[0]
    per_epoch = n // batch_size
    total = epochs * per_epoch
    before = block_mse(block, x, y, kwargs, batch_size)
    params = [p for g in groups for p in g["params"]]
    start = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / max(total, 1))))
    gen = torch.Generator().manual_seed(seed)
    norm = float(y.double().pow(2).mean()) or 1.0  # scale-free loss (see the module docstring)
    losses: list[float] = []
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen)
            run = 0.0
            for b in range(per_epoch):
                idx = order[b * batch_size:(b + 1) * batch_size]
                loss = (block_output(block, x[idx], kwargs) - y[idx]).pow(2).mean() / norm
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                run += float(loss.detach()) * norm
            losses.append(run / max(per_epoch, 1))
    opt.zero_grad(set_to_none=True)
    after = block_mse(block, x, y, kwargs, batch_size)
    reverted = None
    if after > before:
        with torch.no_grad():
            for p, s0 in zip(params, start):
                p.copy_(s0)
        reverted, after = after, block_mse(block, x, y, kwargs, batch_size)
    return BlockFit(before, after, total, total * batch_size * int(x.shape[1]), time.process_time() - c0, losses,
                    reverted)
