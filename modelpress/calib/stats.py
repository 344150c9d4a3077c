"""Running statistics of a linear layer's inputs: tensors in, tensors out.

Capture hooks feed every calibration batch to an accumulator; the algorithms read the result:

* :class:`HessianAccumulator` -> ``H = 2/n * sum_t x_t x_t^T`` (GPTQ, SparseGPT).
* :class:`ActStatsAccumulator` -> per input channel mean |x|, max |x| and sum of x^2
  (AWQ, Wanda, SmoothQuant).

Both keep their state on the device of the first batch they see and never move it.
"""
from __future__ import annotations

import torch


def _tokens(x: torch.Tensor, in_features: int) -> torch.Tensor:
    """(..., in) -> (n_tokens, in), checking the width."""
    if x.shape[-1] != in_features:
        raise ValueError(f"expected inputs with {in_features} features, got shape {tuple(x.shape)}")
    return x.detach().reshape(-1, in_features)


class HessianAccumulator:
    """``H = 2/n * sum_t x_t x_t^T`` over every token seen, as a running mean (as GPTQ does).

    The running mean keeps ``H`` on the scale of one token, so float32 stays accurate over
    millions of tokens; pass ``dtype=torch.float64`` for more headroom.

    Example:
        >>> acc = HessianAccumulator(8)
        >>> acc.update(torch.randn(2, 5, 8))   # (batch, seq, in)
        >>> acc.H.shape, acc.nsamples
        (torch.Size([8, 8]), 10)
    """

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float32) -> None:
        self.in_features = in_features
        self.dtype = dtype
        self.nsamples = 0
        self._H: torch.Tensor | None = None  # (in, in), allocated on the first batch's device
        self._lower_only = False  # only the lower triangle is accumulated (tiles), mirrored on read

    def update(self, x: torch.Tensor) -> None:
        """Add a batch of inputs of shape (..., in_features)."""
        X = _tokens(x, self.in_features).to(self.dtype)  # (n, in)
        n = X.shape[0]
        if n == 0:
            return
        if self._H is None:
            self._H = torch.zeros(self.in_features, self.in_features, dtype=self.dtype, device=X.device)
        # H_new = (N H_old + 2 X^T X) / (N + n), with the sqrt folded into X as the reference code does
        self._H *= self.nsamples / (self.nsamples + n)
        self.nsamples += n
        X = X * (2.0 / self.nsamples) ** 0.5
        if not _syrk_lower_(self._H, X):
            self._H.addmm_(X.T, X)  # (in, in)
        else:
            self._lower_only = True

    @property
    def H(self) -> torch.Tensor:
        """The Hessian (in, in); zeros before any update."""
        if self._H is None:
            return torch.zeros(self.in_features, self.in_features, dtype=self.dtype)
        if self._lower_only:  # mirror the accumulated lower triangle into the upper one
            upper = torch.ones_like(self._H, dtype=torch.bool).triu_(1)
            self._H[upper] = self._H.T[upper]
            self._lower_only = False
        return self._H

    def take_H(self) -> torch.Tensor:
        """Hand the Hessian over (the accumulator forgets it), so its new owner may overwrite or free it."""
        H, self._H = self.H, None
        return H


#: Tile width of the lower-triangle product: tiles below it cost more in calls than they save.
SYRK_TILE = 192


def _syrk_lower_(H: torch.Tensor, X: torch.Tensor) -> bool:
    """``H += X^T X`` in the lower triangle of ``H`` only, tile by tile with torch's own matmul
    (about (T + 1) / 2T of the multiply-adds of the full product for T tiles a side); False where a
    single tile would cover the matrix (the caller does the full product).

    torch's matmul, not a BLAS syrk through scipy: a second thread pool (OpenBLAS's) spinning beside
    torch's OpenMP threads during the block forwards was measured to slow both.
    """
    d = H.shape[0]
    T = d // SYRK_TILE
    if T < 2:
        return False
    bounds = [d * k // T for k in range(T + 1)]
    for i in range(T):
        r0, r1 = bounds[i], bounds[i + 1]
        # rows r0:r1 of H, columns 0:r1 (the diagonal tile and everything left of it)
        H[r0:r1, :r1].addmm_(X[:, r0:r1].T, X[:, :r1])
    return True


class ActStatsAccumulator:
    """Per input channel statistics of |x| over every token seen.

    ``mean_abs`` (AWQ's activation scale), ``max_abs`` (SmoothQuant), ``sq_sum`` and ``l2_norm``
    (Wanda's ``||X_j||_2`` over all tokens), each of shape (in_features,).

    Example:
        >>> acc = ActStatsAccumulator(4)
        >>> acc.update(-torch.ones(3, 4))   # (tokens, in)
        >>> acc.mean_abs.tolist(), acc.sq_sum.tolist()
        ([1.0, 1.0, 1.0, 1.0], [3.0, 3.0, 3.0, 3.0])
    """

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float32) -> None:
        self.in_features = in_features
        self.dtype = dtype
        self.ntokens = 0
        self._abs_sum: torch.Tensor | None = None  # (in,)
        self._abs_max: torch.Tensor | None = None  # (in,)
        self._sq_sum: torch.Tensor | None = None  # (in,)

    def update(self, x: torch.Tensor) -> None:
        """Add a batch of inputs of shape (..., in_features)."""
        X = _tokens(x, self.in_features).to(self.dtype).abs()  # (n, in)
        if X.shape[0] == 0:
            return
        if self._abs_sum is None:
            self._abs_sum = torch.zeros(self.in_features, dtype=self.dtype, device=X.device)
            self._abs_max = torch.zeros_like(self._abs_sum)
            self._sq_sum = torch.zeros_like(self._abs_sum)
        self.ntokens += X.shape[0]
        self._abs_sum += X.sum(0)
        torch.maximum(self._abs_max, X.amax(0), out=self._abs_max)
        self._sq_sum += (X * X).sum(0)

    def _get(self, t: torch.Tensor | None) -> torch.Tensor:
        return torch.zeros(self.in_features, dtype=self.dtype) if t is None else t

    @property
    def mean_abs(self) -> torch.Tensor:
        """Mean |x| per channel, (in,)."""
        return self._get(self._abs_sum) / max(self.ntokens, 1)

    @property
    def max_abs(self) -> torch.Tensor:
        """Max |x| per channel, (in,)."""
        return self._get(self._abs_max)

    @property
    def sq_sum(self) -> torch.Tensor:
        """Sum over tokens of x^2 per channel, (in,)."""
        return self._get(self._sq_sum)

    @property
    def l2_norm(self) -> torch.Tensor:
        """``||X_j||_2`` over all tokens per channel, (in,)."""
        return self.sq_sum.sqrt()
