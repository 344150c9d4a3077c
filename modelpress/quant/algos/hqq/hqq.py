"""HQQ: half-quadratic quantisation (Badri & Shaji, 2023), the zero-point solver. Tensors in, tensors out.

With ``Q_z(W) = clamp(round(W / s + z), 0, qmax)`` and ``Q_z^{-1}(Wq) = (Wq - z) s``, HQQ minimises the
sparsity-promoting error ``phi(W - Q_z^{-1}(Q_z(W)))``, ``phi = ||.||_p^p`` with ``p < 1`` (it ignores a
few large errors, those of outliers, in favour of many small ones), over the zero point ``z`` with the
scale ``s`` fixed. Splitting the error off as ``W_e`` (half-quadratic splitting, penalty ``beta``):

    W_e <- shrink_lp(W - Q_z^{-1}(Q_z(W)), beta)          # the generalised soft-thresholding prox of phi
    z   <- < Q_z(W) - (W - W_e) / s >                      # closed form: the mean over the group
    beta <- kappa * beta

``shrink_lp`` zeroes every error below ``beta^(-1/(2-p))`` (0.17 in weight units at the defaults),
more than most LLM weights' rounding errors: for those the ``z`` update is the least-squares zero
for the current codes, and only the errors of outliers are split off into ``W_e``.

The names follow the paper and the reference (mobiusml/hqq ``optimize_weights_proximal``); its scale is
our ``1 / s``. One change: the reference stops every group together once the tensor's mean |error|
stops falling; here each group keeps the iterate with its least squared error (the output error of a
layer whose inputs are uncorrelated), which also guarantees the result is never worse than the start.
"""
from __future__ import annotations

import torch

from ...formats.base import Params
from ...formats.int_fz import FloatZeroIntFormat


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalised soft-thresholding, the prox of ``||.||_p^p / beta``: ``sign(x) relu(|x| - |x|^(p-1) / beta)``.

    ``x == 0`` stays 0 (``|x|`` is clamped away from 0 before the negative power).

    Example:
        >>> shrink_lp(torch.tensor([-2.0, 0.05, 0.0]), beta=10.0, p=1.0)
        tensor([-1.9000,  0.0000,  0.0000])
    """
    a = x.abs()
    # |x|^(p-1) as exp((p-1) log|x|): vectorised on CPU, where pow with a float exponent is not (2x faster)
    a_pow = torch.exp(torch.log(a.clamp_min(torch.finfo(x.dtype).tiny)) * (p - 1))
    return torch.copysign(torch.relu(a - a_pow / beta), x)


def hqq_zero(W: torch.Tensor, params: Params, fmt: FloatZeroIntFormat, *, p: float, beta: float, kappa: float,
             iters: int, early_stop: bool = True) -> torch.Tensor:
    """The half-quadratic zero point per group; the scale stays as given.

    Args:
        W: grouped weight (rows, n_groups, G).
        params: the start, ``scale`` and ``zero`` (rows, n_groups, 1), e.g. a min-max fit.
        fmt: the float-zero integer format (``Q_z`` is its encode, ``Q_z^{-1}`` its decode); each new
            ``z`` is rounded to the precision the format stores.
        p, beta, kappa, iters: the paper's ``p``, ``beta``, ``kappa`` and the most iterations.
        early_stop: stop once the weight's total squared error stops falling (the reference stops on
            its mean |error|), instead of always running ``iters`` iterations.

    Returns:
        ``z`` (rows, n_groups, 1): per group the iterate with the least squared error.

    Example:
        >>> fmt = FloatZeroIntFormat(bits=4, granularity=64)
        >>> W = fmt.grouped(torch.randn(8, 128))
        >>> hqq_zero(W, fmt.fit(W), fmt, p=0.7, beta=10.0, kappa=1.01, iters=20).shape
        torch.Size([8, 2, 1])
    """
    s, z = params["scale"], params["zero"]  # (rows, n_groups, 1)
    s_safe = torch.where(s == 0, torch.ones_like(s), s)  # an all-zero group has s = 0 and stays at z

    def quantize(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # Q_z(W) and W - Q_z^{-1}(Q_z(W))
        grid = {"scale": s, "zero": z}
        Wq = fmt.encode(W, grid).to(W.dtype)  # decoding float codes is the same map and saves a cast
        return Wq, W - fmt.decode(Wq, grid)

    Wq, E = quantize(z)
    best_z = z
    best_err = err = E.square().sum(dim=-1, keepdim=True)
    for _ in range(iters):
        W_e = shrink_lp(E, beta, p)  # (rows, n_groups, G)
        z = fmt.store_zero(Wq.mean(dim=-1, keepdim=True) - (W - W_e).mean(dim=-1, keepdim=True) / s_safe)
        beta *= kappa
        Wq, E = quantize(z)
        last, err = err, E.square().sum(dim=-1, keepdim=True)
        better = err < best_err
        best_z, best_err = torch.where(better, z, best_z), torch.where(better, err, best_err)
        if early_stop and err.sum() >= last.sum():
            break
    return best_z
