"""Choosing each layer's rank: given, by an energy threshold, or by a parameter budget.

A factorised (out, in) layer of rank r stores ``(out + in) r`` weights instead of ``out * in``.
The budget ``param_ratio`` is the fraction of the targeted linears' weights kept, met either per
layer (``uniform``: ``r = floor(ratio * out * in / (out + in))``) or across all of them
(``global``): every layer starts at rank 1 and the budget is spent greedily on the singular
values that remove the most relative energy ``σ_j² / ||W||_F²`` per weight they cost
(``out + in``), so layers whose spectrum decays fast give up rank to layers whose does not.
"""
from __future__ import annotations

import heapq
from typing import Callable, Literal

import torch
from pydantic import Field, model_validator

from ..core.errors import ModelpressError
from ..core.method import MethodConfig


class RankConfig(MethodConfig):
    """Rank rule fields shared by the factorising stages: at most one of ``rank``, ``energy`` and
    ``param_ratio`` (none: ``param_ratio`` 0.8, i.e. 20% fewer weights).

    Example:
        >>> RankConfig(method="svd", energy=0.9).param_ratio is None
        True
    """

    rank: int | None = Field(None, ge=1, description="the same rank for every layer (at most min(out, in))")
    energy: float | None = Field(None, gt=0, le=1, description="smallest rank keeping this fraction of sum σ²")
    param_ratio: float | None = Field(None, gt=0, lt=1, description="fraction of the layers' weights kept")
    allocation: Literal["uniform", "global"] = Field("uniform", description="param_ratio per layer, or over all")

    @model_validator(mode="after")
    def _one_rule(self) -> "RankConfig":
        given = [k for k in ("rank", "energy", "param_ratio") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of rank, energy, param_ratio, not {' and '.join(given)}")
        if not given:
            object.__setattr__(self, "param_ratio", 0.8)
        if self.allocation == "global" and self.param_ratio is None:
            raise ValueError("allocation 'global' spreads a param_ratio budget; it needs param_ratio, not "
                             f"{given[0]}")
        return self


def ratio_rank(shape: tuple[int, int], ratio: float, name: str = "layer") -> int:
    """Largest r with ``(out + in) r <= ratio * out * in``; below 1 the budget cannot be met.

    Example:
        >>> ratio_rank((576, 1536), 0.8)
        348
    """
    out, inp = shape
    r = int(ratio * out * inp // (out + inp))
    if r < 1:
        raise ModelpressError(f"{name}: param_ratio {ratio:g} cannot be met for a {out}x{inp} weight (rank 1 "
                              f"already keeps {(out + inp) / (out * inp):.3g} of its weights)")
    return min(r, min(shape))


def energy_rank(sigma: torch.Tensor, energy: float) -> int:
    """Smallest r with ``sum_{j<r} σ_j² >= energy * sum σ²`` (sigma sorted descending).

    Example:
        >>> energy_rank(torch.tensor([3.0, 1.0, 0.0]), 0.9)
        1
    """
    e = sigma.double().pow(2)
    total = float(e.sum())
    if total == 0:
        return 1
    cum = e.cumsum(0) / total
    return min(int((cum < energy - 1e-12).sum()) + 1, sigma.numel())


def global_ranks(spectra: dict[str, tuple[tuple[int, int], torch.Tensor]], ratio: float) -> dict[str, int]:
    """Ranks meeting ``ratio`` of the layers' total weights, spent where σ² per weight is largest.

    ``spectra``: name -> ((out, in), singular values descending). Ranks are capped where a factorised
    layer would stop saving weights (``(out + in) r <= out * in``).

    Example:
        >>> flat, steep = torch.ones(8), torch.tensor([8.0] + [0.1] * 7)
        >>> global_ranks({"a": ((8, 8), flat), "b": ((8, 8), steep)}, 0.5)
        {'a': 3, 'b': 1}
    """
    total = sum(s[0] * s[1] for s, _ in spectra.values())
    budget = int(ratio * total)
    ranks = {n: 1 for n in spectra}
    spent = sum(sum(s) for s, _ in spectra.values())
    if spent > budget:
        raise ModelpressError(f"param_ratio {ratio:g} cannot be met over {len(spectra)} layer(s): rank 1 everywhere "
                              f"already keeps {spent / total:.3g} of their weights")
    caps = {n: min(min(s), s[0] * s[1] // sum(s)) for n, (s, _) in spectra.items()}
    energy = {n: sig.double().pow(2) / max(float(sig.double().pow(2).sum()), 1e-300) for n, (_, sig) in spectra.items()}
    cost = {n: sum(s) for n, (s, _) in spectra.items()}
    heap = [(-float(energy[n][1]) / cost[n], n) for n in spectra if caps[n] > 1]
    heapq.heapify(heap)
    while heap:
        _, n = heapq.heappop(heap)
        if spent + cost[n] > budget:
            continue  # this layer's next value does not fit; a cheaper layer's still may
        ranks[n] += 1
        spent += cost[n]
        if ranks[n] < caps[n]:
            heapq.heappush(heap, (-float(energy[n][ranks[n]]) / cost[n], n))
    return ranks


def rank_rule(cfg: RankConfig, name: str, shape: tuple[int, int],
              planned: dict[str, int] | None = None) -> int | Callable[[torch.Tensor], int]:
    """The rank for layer ``name``: a number, or a rule applied to the spectrum the method truncates."""
    if planned is not None:
        return planned[name]
    if cfg.rank is not None:
        if cfg.rank > min(shape):
            raise ModelpressError(f"{name}: rank {cfg.rank} exceeds min(out, in) = {min(shape)} of its "
                                  f"{shape[0]}x{shape[1]} weight")
        return cfg.rank
    if cfg.energy is not None:
        return lambda sigma: energy_rank(sigma, cfg.energy)
    return ratio_rank(shape, cfg.param_ratio, name)
