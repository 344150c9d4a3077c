"""Activation observers: watch calibration activations, then choose one int8 (scale, zero).

Each observer is a small stateful object::

    obs = OBSERVERS.get("histogram")()
    for x in batches:
        obs.update(x)
    scale, zero = obs.qparams(bits=8, symmetric=True)

They differ only in how they pick the clipping range [lo, hi] (the grid maths is shared):

* ``minmax``          the exact extremes seen.
* ``moving_average``  extremes of each batch, averaged with ``momentum`` (PyTorch's
                      MovingAverageMinMaxObserver): robust to one odd batch.
* ``percentile``      the ``percentile``-th quantile of |x| (or of x at both ends), on a bounded
                      uniform random sample of everything seen: clips rare outliers.
* ``mse``             the range shrink factor minimising the quantisation MSE of that sample
                      (searched on a geometric grid down to 1e-3 of the range).
* ``histogram``       TensorRT's entropy calibration: a 2048-bin histogram of |x| and the threshold
                      minimising KL(P || Q) between the clipped reference distribution P and its
                      quantised version Q.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..core.config import Registry
from .activation import act_qparams, fake_quantize_act

#: name -> observer class (constructed with its keyword defaults).
OBSERVERS: Registry[type["Observer"]] = Registry("observer")


class Observer(ABC):
    """Collects activations (``update``) and turns them into quantisation parameters (``qparams``)."""

    @abstractmethod
    def update(self, x: torch.Tensor) -> None:
        """Observe one batch (any shape)."""

    @abstractmethod
    def range(self, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The clipping range (lo, hi) chosen for a ``bits``-wide grid, 0-d tensors."""

    def qparams(self, bits: int = 8, symmetric: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) as 0-d float32 / int32 tensors."""
        lo, hi = self.range(bits, symmetric)
        return act_qparams(lo, hi, symmetric, bits)


class _Reservoir:
    """A uniform random sample (without replacement) of at most ``size`` of all values seen.

    Bottom-k sampling: every value gets a uniform random key and the ``size`` smallest keys are
    kept, so the sample is uniform over everything seen whatever the batch sizes.
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size = size
        self.gen = torch.Generator().manual_seed(seed)
        self.values = torch.empty(0)
        self.keys = torch.empty(0)

    def add(self, x: torch.Tensor) -> None:
        v = x.detach().float().reshape(-1).cpu()
        k = torch.rand(v.numel(), generator=self.gen)
        if v.numel() > self.size:  # pre-select the batch's own bottom-k: the rest can never be kept
            k, idx = torch.topk(k, self.size, largest=False)
            v = v[idx]
        values, keys = torch.cat([self.values, v]), torch.cat([self.keys, k])
        if values.numel() > self.size:
            keys, idx = torch.topk(keys, self.size, largest=False)
            values = values[idx]
        self.values, self.keys = values, keys


@OBSERVERS.register("minmax")
class MinMaxObserver(Observer):
    """The running minimum and maximum.

    Example:
        >>> obs = MinMaxObserver(); obs.update(torch.tensor([-1.0, 2.54]))
        >>> obs.qparams(symmetric=True)[0]
        tensor(0.0200)
    """

    def __init__(self) -> None:
        self.lo = self.hi = None

    def update(self, x: torch.Tensor) -> None:
        lo, hi = x.detach().min().float().cpu(), x.detach().max().float().cpu()
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def range(self, bits: int = 8, symmetric: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lo is None:
            raise ValueError("observer saw no data")
        return self.lo, self.hi


@OBSERVERS.register("moving_average")
class MovingAverageMinMaxObserver(MinMaxObserver):
    """Per-batch extremes averaged as ``r <- r + momentum * (batch - r)`` (first batch sets ``r``)."""

    def __init__(self, momentum: float = 0.01) -> None:
        super().__init__()
        self.momentum = momentum

    def update(self, x: torch.Tensor) -> None:
        lo, hi = x.detach().min().float().cpu(), x.detach().max().float().cpu()
        if self.lo is None:
            self.lo, self.hi = lo, hi
            return
        self.lo = self.lo + self.momentum * (lo - self.lo)
        self.hi = self.hi + self.momentum * (hi - self.hi)


class _SampleObserver(Observer):
    """Base of observers that decide on a bounded random sample of the values (plus exact extremes)."""

    def __init__(self, max_samples: int = 1 << 18, seed: int = 0) -> None:
        self.sample = _Reservoir(max_samples, seed)
        self.extremes = MinMaxObserver()

    def update(self, x: torch.Tensor) -> None:
        self.sample.add(x)
        self.extremes.update(x)


@OBSERVERS.register("percentile")
class PercentileObserver(_SampleObserver):
    """Clip at the ``percentile``-th quantile: of |x| when symmetric, of x at both ends otherwise.

    Example:
        >>> obs = PercentileObserver(percentile=99.0)
        >>> obs.update(torch.cat([torch.linspace(-1, 1, 1000), torch.tensor([100.0])]))
        >>> float(obs.range(8, True)[1]) < 2
        True
    """

    def __init__(self, percentile: float = 99.99, max_samples: int = 1 << 18, seed: int = 0) -> None:
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        super().__init__(max_samples, seed)
        self.percentile = percentile

    def range(self, bits: int = 8, symmetric: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        v, q = self.sample.values, self.percentile / 100
        if v.numel() == 0:
            raise ValueError("observer saw no data")
        if symmetric:
            t = torch.quantile(v.abs(), q)
            return -t, t
        return torch.quantile(v, 1 - q), torch.quantile(v, q)


@OBSERVERS.register("mse")
class MSEObserver(_SampleObserver):
    """The range ``shrink * [min, max]`` with the least quantisation MSE of the observed sample: trades
    clipping error on outliers against rounding error on the rest.

    ``shrink`` runs over a geometric grid from 1 down to ``min_shrink`` (~7 % apart by default), so a
    heavy tail whose best clip is a few percent of the range is found as well as a mild one.
    """

    def __init__(self, grid: int = 100, min_shrink: float = 1e-3, max_samples: int = 1 << 18, seed: int = 0) -> None:
        super().__init__(max_samples, seed)
        self.shrinks = torch.logspace(0.0, torch.log10(torch.tensor(min_shrink)).item(), grid)

    def range(self, bits: int = 8, symmetric: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.extremes.range()
        v = self.sample.values  # (n,)
        chunk = max(1, (1 << 22) // max(v.numel(), 1))  # candidates per pass: bounded (chunk, n) tensors
        errs = []
        for shr in self.shrinks.split(chunk):
            s, z = act_qparams(lo * shr[:, None], hi * shr[:, None], symmetric, bits)  # each (chunk, 1)
            errs.append((fake_quantize_act(v[None], s, z, symmetric, bits) - v).pow(2).mean(1))  # (chunk,)
        best = self.shrinks[torch.cat(errs).argmin()]  # the first (widest) range wins ties
        return lo * best, hi * best


@OBSERVERS.register("histogram")
class HistogramObserver(Observer):
    """Entropy (KL) calibration of TensorRT on a ``bins``-bin histogram of |x| over [0, amax].

    Exact zeros are left out (as ``skip_zeros`` in NVIDIA's calibrator): after a ReLU they are a spike
    that every grid represents exactly, and it would drag the threshold down. The grid has
    ``2**(bits-1)`` levels per side, or ``2**bits`` for an asymmetric grid over one-signed data.
    When a batch exceeds the current range, the range doubles and adjacent bins merge in pairs,
    which keeps the histogram exact (no re-binning approximation).
    """

    def __init__(self, bins: int = 2048) -> None:
        if bins % 2:
            raise ValueError("bins must be even (the range grows by merging bin pairs)")
        self.bins = bins
        self.hist = torch.zeros(bins, dtype=torch.float64)
        self.amax: float | None = None  # upper edge of the histogram
        self.extremes = MinMaxObserver()

    def update(self, x: torch.Tensor) -> None:
        a = x.detach().float().abs().reshape(-1).cpu()
        a = a[a > 0]  # exact zeros (ReLU) are on every grid and say nothing about the range
        self.extremes.update(x)
        top = float(a.max()) if a.numel() else 0.0
        if self.amax is None:
            self.amax = top if top > 0 else 1.0
        while top > self.amax:
            self.hist = self.hist.view(-1, 2).sum(1)
            self.hist = torch.cat([self.hist, torch.zeros_like(self.hist)])
            self.amax *= 2
        self.hist += torch.histc(a, self.bins, 0.0, self.amax).double()

    def range(self, bits: int = 8, symmetric: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        if self.amax is None:
            raise ValueError("observer saw no data")
        lo, hi = self.extremes.range()
        if self.hist.sum() == 0:  # only zeros seen
            return lo, hi
        one_sided = not symmetric and (lo >= 0 or hi <= 0)
        i = kl_threshold_bin(self.hist, 1 << (bits if one_sided else bits - 1))
        t = torch.tensor(i * self.amax / self.bins, dtype=torch.float32)
        return torch.maximum(lo, -t), torch.minimum(hi, t)


def kl_threshold_bin(hist: torch.Tensor, n_quant: int = 128, chunk: int = 512) -> int:
    """Number of histogram bins to keep (threshold = that bin's upper edge), TensorRT style.

    For each candidate ``i`` in [n_quant, bins]: P is ``hist[:i]`` with the clipped mass ``hist[i:]``
    added to its last bin; Q merges ``hist[:i]`` into ``n_quant`` levels and spreads each level back
    uniformly over the bins that were non-empty. The ``i`` with the least KL(P || Q) wins.
    Candidates are evaluated ``chunk`` at a time as rows of one tensor.
    """
    hist = hist.double()
    cands = torch.arange(n_quant, hist.numel() + 1)
    kls = torch.cat([_kl_rows(hist, i, n_quant) for i in cands.split(chunk)])  # (n_cands,)
    return int(cands[kls.argmin()])


def _kl_rows(hist: torch.Tensor, i: torch.Tensor, n_quant: int) -> torch.Tensor:
    """KL(P_i || Q_i) for every candidate bin count in ``i`` (c,); ``hist`` (B,)."""
    tail = torch.cat([hist.flip(0).cumsum(0).flip(0), hist.new_zeros(1)])  # (B + 1,) tail[k] = hist[k:].sum()
    width = int(i.max())  # columns any of these candidates keeps
    kept = torch.arange(width)[None, :] < i[:, None]  # (c, width)
    h = torch.where(kept, hist[None, :width], hist.new_zeros(()))  # (c, width): hist[:i], zeros after
    p = h.clone()
    p[torch.arange(i.numel()), i - 1] += tail[i]  # clipped mass joins the last kept bin
    q = _quantized_rows(h, kept, i, n_quant)
    return _kl(p, q)


def _quantized_rows(h: torch.Tensor, kept: torch.Tensor, i: torch.Tensor, n_quant: int) -> torch.Tensor:
    """Each row of ``h`` (c, B) merged into ``n_quant`` levels and expanded back over its non-empty bins."""
    level = torch.where(kept, torch.arange(h.shape[1])[None, :] * n_quant // i[:, None], n_quant)  # (c, B)
    nonzero = (h > 0).double()
    mass = torch.zeros(h.shape[0], n_quant + 1, dtype=h.dtype).scatter_add_(1, level, h)  # (c, n_quant + 1)
    count = torch.zeros_like(mass).scatter_add_(1, level, nonzero)
    return torch.where(nonzero > 0, mass.gather(1, level) / count.gather(1, level).clamp_min(1), torch.zeros_like(h))


def _kl(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Row-wise KL(P || Q) of histograms (c, B) after normalising; Q gets ``eps`` where P has mass
    but Q has none (MXNet's smoothing), so the divergence stays finite.
    """
    p = p / p.sum(1, keepdim=True)
    q = torch.where((q == 0) & (p > 0), torch.full_like(q, eps), q)
    q = q / q.sum(1, keepdim=True)
    ratio = torch.where(p > 0, p / q.clamp_min(1e-300), torch.ones_like(p))
    return (p * ratio.log()).sum(1)


__all__ = ["OBSERVERS", "HistogramObserver", "MSEObserver", "MinMaxObserver", "MovingAverageMinMaxObserver",
           "Observer", "PercentileObserver", "kl_threshold_bin"]
