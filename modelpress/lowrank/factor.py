"""Low-rank factorisation maths: tensors in, tensors out (no modules, no hooks).

Every method here returns the same thing, a pair ``(B, A)`` with ``W ≈ B @ A``:

* plain SVD: ``W = U Σ V^T``, keep the top ``r``;
* ASVD (Yuan et al., 2023): ``W = (W S) S^-1`` with ``S = diag(mean|x|^alpha)``, SVD of ``W S``, so
  the columns fed by large activations are kept more faithfully;
* FWSVD (Hsu et al., 2022): the same on the other side, ``W = D^-1 (D W)`` with ``D = diag(sqrt I)``
  and ``I_i`` the Fisher information of output row ``i`` (summed squared loss gradients), so the
  truncation minimises ``sum_i I_i ||W_i - W'_i||^2``, exactly the dropped ``σ²`` of ``D W``;
* SVD-LLM (Wang et al., 2024): ``S`` the Cholesky factor of the calibration Gram matrix
  ``G = X^T X = S S^T``. Then ``||(W - W') X^T||_F = ||(W - W') S||_F`` for every ``W'``, so truncating
  the SVD of ``W S`` is the best rank-``r`` fit of the *outputs* (Eckart-Young in the whitened
  space) and the output loss is exactly the sum of the dropped squared singular values of ``W S``.
  The same factorisation of a quantisation residual ``W - Q`` is the EoRA / LQER compensation.

The factors share the singular values evenly (``B = U_r Σ_r^½``, ``A = Σ_r^½ V_r^T S^-1``): neither
factor carries the whole dynamic range, which matters when a later stage quantises them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import torch

from ..core.errors import ModelpressError

#: How many times the Gram dampening is raised tenfold before giving up.
MAX_DAMP_RETRIES = 6

#: A rank, or a rule choosing it from the spectrum being truncated (an energy threshold).
RankSpec = Union[int, Callable[[torch.Tensor], int]]


@dataclass
class Factors:
    """``W ≈ B @ A``: B (out, r), A (r, in); ``sigma`` the full spectrum of the (scaled) weight, the
    first ``r`` kept; ``notes`` what had to be done to the statistics (dampening)."""

    B: torch.Tensor
    A: torch.Tensor
    sigma: torch.Tensor
    notes: list[str]

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def truncation_loss(self) -> float:
        """Sum of the dropped squared singular values: the (whitened) output loss of SVD-LLM."""
        return float(self.sigma[self.rank:].double().pow(2).sum())


def check_rank(rank: int, shape: tuple[int, int], name: str = "layer") -> None:
    """A rank must lie in [1, min(out, in)]."""
    if not 1 <= rank <= min(shape):
        raise ModelpressError(f"{name}: rank {rank} is outside [1, {min(shape)}] for a {shape[0]}x{shape[1]} weight")


def _resolve(rank: RankSpec, s: torch.Tensor, shape: tuple[int, int]) -> int:
    r = rank(s) if callable(rank) else int(rank)
    check_rank(r, shape)
    return r


def _split(U: torch.Tensor, s: torch.Tensor, Vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors of the rank-``rank`` truncation: (U_r Σ_r^½, Σ_r^½ V_r^T)."""
    root = s[:rank].sqrt()  # (r,)
    return U[:, :rank] * root, root[:, None] * Vh[:rank]  # (out, r), (r, in)


def svd_factor(W: torch.Tensor, rank: RankSpec) -> Factors:
    """Plain truncated SVD of W (out, in), in float64.

    Example:
        >>> W = torch.randn(6, 4)
        >>> f = svd_factor(W, 4)
        >>> torch.allclose(f.B @ f.A, W, atol=1e-5)
        True
    """
    if not callable(rank):
        check_rank(rank, tuple(W.shape))
    U, s, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    rank = _resolve(rank, s, tuple(W.shape))
    B, A = _split(U, s, Vh, rank)
    return Factors(B.to(W.dtype), A.to(W.dtype), s.to(W.dtype), [])


def scaled_factor(W: torch.Tensor, scale: torch.Tensor | None, rank: RankSpec, *,
                  row: torch.Tensor | None = None) -> Factors:
    """SVD of ``diag(row) W diag(scale)``, truncated, then both scales undone (row on B, scale on A).

    ``scale`` (in,) is ASVD's column scale, ``row`` (out,) FWSVD's row scale; None means 1, and both
    must be positive. ``sigma`` is the spectrum of the scaled weight, so ``truncation_loss()`` is the
    scaled error ``||diag(row) (W - B A) diag(scale)||_F^2``.

    Example:
        >>> W = torch.randn(5, 4); d = torch.rand(5) + 0.1
        >>> f = scaled_factor(W, None, 2, row=d)
        >>> abs(float((d[:, None] * (W - f.B @ f.A)).pow(2).sum()) - f.truncation_loss()) < 1e-4
        True
    """
    if not callable(rank):
        check_rank(rank, tuple(W.shape))
    c = scale.double() if scale is not None else torch.ones(W.shape[1], dtype=torch.float64)  # (in,)
    d = row.double() if row is not None else torch.ones(W.shape[0], dtype=torch.float64)  # (out,)
    U, s, Vh = torch.linalg.svd(d[:, None] * W.double() * c, full_matrices=False)
    rank = _resolve(rank, s, tuple(W.shape))
    B, A = _split(U, s, Vh, rank)
    return Factors((B / d[:, None]).to(W.dtype), (A / c).to(W.dtype), s.to(W.dtype), [])


def _floored(s: torch.Tensor) -> torch.Tensor:
    """Zero entries raised to the smallest positive one (all zero: ones), so a scale stays invertible."""
    floor = s[s > 0].min() if bool((s > 0).any()) else torch.ones((), dtype=s.dtype)
    return torch.where(s > 0, s, floor)


def asvd_scale(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """ASVD's column scale ``mean|x|^alpha`` (in,), floored so a dead input column stays invertible."""
    return _floored(mean_abs.double().clamp_min(0) ** alpha)


def fisher_scale(row_fisher: torch.Tensor) -> torch.Tensor:
    """FWSVD's row scale ``sqrt(I)`` (out,) from the per-row Fisher information ``I``, floored so a
    row the loss never reached (zero gradient) stays invertible.

    Example:
        >>> fisher_scale(torch.tensor([0.0, 4.0, 1.0])).tolist()
        [1.0, 2.0, 1.0]
    """
    return _floored(row_fisher.double().clamp_min(0).sqrt())


def whitening(G: torch.Tensor, damp: float = 0.0) -> tuple[torch.Tensor, list[str]]:
    """Lower Cholesky factor S of the Gram matrix G (in, in), ``G + λ I = S S^T``, in float64.

    ``λ = damp * mean(diag G)``; a G that is not positive definite (rank-deficient calibration, a
    dead input channel) is dampened tenfold until it is, starting at 1e-6 when ``damp`` is 0, and
    the returned notes say so.
    """
    G = G.double()
    mean_diag = float(G.diagonal().mean()) or 1.0
    tried = []
    lam = damp
    for _ in range(MAX_DAMP_RETRIES + 1):
        S, info = torch.linalg.cholesky_ex(G + lam * mean_diag * torch.eye(G.shape[0], dtype=G.dtype))
        if int(info) == 0 and bool(torch.isfinite(S).all()):
            notes = [f"Gram matrix not positive definite with dampening {tried[0]:g}; used {lam:g} x mean diagonal"] \
                if tried else []
            return S, notes
        tried.append(lam)
        lam = 10 * lam if lam > 0 else 1e-6
    raise ModelpressError(f"Gram matrix not positive definite even with dampening {tried[-1]:g} x mean diagonal")


def whitened_factor(W: torch.Tensor, G: torch.Tensor, rank: RankSpec, damp: float = 0.0) -> Factors:
    """SVD-LLM: the rank-``rank`` ``B @ A`` minimising ``||(W - B A) X^T||_F`` where ``G = X^T X``.

    W (out, in), G (in, in). ``sigma`` is the spectrum of ``W S``; the output loss of the
    truncation is ``Factors.truncation_loss()`` (exact for the dampened G).

    Example:
        >>> X = torch.randn(64, 5); W = torch.randn(3, 5)
        >>> f = whitened_factor(W, X.T @ X, 2)
        >>> abs(float(((W - f.B @ f.A) @ X.T).pow(2).sum()) - f.truncation_loss()) < 1e-3
        True
    """
    if not callable(rank):
        check_rank(rank, tuple(W.shape))
    S, notes = whitening(G, damp)  # (in, in) lower
    U, s, Vh = torch.linalg.svd(W.double() @ S, full_matrices=False)
    rank = _resolve(rank, s, tuple(W.shape))
    B, A_white = _split(U, s, Vh, rank)  # A_white (r, in) acts on whitened inputs
    # A = A_white S^-1  <=>  S^T A^T = A_white^T (S^T upper triangular)
    A = torch.linalg.solve_triangular(S.T, A_white.T, upper=True).T
    return Factors(B.to(W.dtype), A.to(W.dtype), s.to(W.dtype), notes)
