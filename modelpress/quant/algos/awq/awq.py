"""AWQ (Lin et al., 2023, arXiv:2306.00978): pure maths, tensors in, tensors out.

A linear's output is ``X W^T``. For any positive per-input-channel ``s`` it is also
``(X / s) (W * s)^T``; AWQ quantises ``W * s`` instead of ``W``, which shrinks the relative rounding
error on the input channels that carry large activations ("salient" channels), and folds ``1 / s``
into the op that produced ``X`` (a norm's weight, or the previous linear's output rows), so the
float function is unchanged and nothing is added at inference.

``s = mean|x| ** alpha`` with ``alpha`` chosen on a grid to minimise the output error of the layers
fed by ``X`` (:func:`search_scales`); afterwards each group's clipping range is shrunk where that
lowers the group's output error (:func:`search_clip`, the reference ``auto_clip``). Names follow
mit-han-lab/llm-awq (``auto_scale.py``, ``auto_clip.py``).

The format is only used through its contract (``grouped`` / ``fit`` / ``encode`` / ``decode`` /
``roundtrip_params`` / ``fake_quantize``), so every registered format works.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from ...formats.base import FitPlan, QTensor, WeightFormat
from ...granularity import PerTensor


class ScaleSearch(NamedTuple):
    """What :func:`search_scales` returns.

    ``table`` lists ``(alpha, loss)`` for every candidate tried, in order; ``alpha`` is None for the
    identity ``s = 1`` that duo scaling adds (without duo scaling ``alpha = 0`` *is* the identity).
    """

    scales: torch.Tensor  # (in,)
    best_error: float
    table: list[tuple[float | None, float]]

    @property
    def alpha(self) -> float | None:
        """The chosen exponent (None: no scaling was best)."""
        return min(self.table, key=lambda r: r[1])[0]


# ---- the objective ------------------------------------------------------------------------------
def scaled_output_error(s: torch.Tensor, W_list: list[torch.Tensor], X: torch.Tensor, fmt: WeightFormat) -> float:
    """``sum_i || X W_i^T - (X / s) Q(W_i * s)^T ||^2`` (the AWQ objective for one input).

    Computed as ``|| X (W_i - Q(W_i * s) / s)^T ||^2``; with ``s = 1`` this is RTN's output error.

    Example:
        >>> from modelpress.quant.formats import IntFormat
        >>> W, X, fmt = torch.randn(8, 16), torch.randn(32, 16), IntFormat(bits=4)
        >>> rtn = float((X @ (W - fmt.fake_quantize(W)).T).pow(2).sum())
        >>> abs(scaled_output_error(torch.ones(16), [W], X, fmt) - rtn) < 1e-3 * rtn
        True
    """
    s_row = s.view(1, -1)  # (1, in)
    total = 0.0
    for W in W_list:
        E = W - fmt.fake_quantize(W * s_row) / s_row  # (out, in)
        total += float((X @ E.T).double().pow(2).sum())  # (n, out) -> scalar
    return total


def token_basis(X: torch.Tensor) -> torch.Tensor:
    """A matrix with the same Gram ``X^T X`` as ``X`` (n_tokens, in) and at most ``in`` rows, float32.

    Every loss here is ``||X E^T||^2 = tr(E X^T X E^T)``, so ``X`` can be replaced by the ``R`` of
    its QR factorisation when there are more tokens than channels: each of the ``grid`` losses
    then costs ``in`` rows instead of ``n_tokens``.
    """
    if X.shape[0] <= X.shape[1]:
        return X.float()
    return torch.linalg.qr(X.double(), mode="r")[1].float()  # (in, in)


# ---- scale search -------------------------------------------------------------------------------
def candidate_scales(x_mean: torch.Tensor, alpha: float, w_mean: torch.Tensor | None = None) -> torch.Tensor:
    """``s = mean|x| ** alpha`` (duo: ``/ mean|w_normalised| ** (1 - alpha)``), normalised to geometric mid 1.

    The normalisation ``s / sqrt(max(s) min(s))`` keeps ``W * s`` in a sane range; it does not
    change the objective beyond the format's scale rounding.
    """
    s = x_mean.pow(alpha)  # (in,)
    if w_mean is not None:
        s = s / (w_mean.pow(1 - alpha) + 1e-4)
    s = s.clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def weight_mean(W: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    """Per input channel mean of ``|w|`` normalised to its group's max (duo scaling's ``w_mean``), (in,)."""
    Wg = fmt.grouped(W).abs()  # (rows, n_groups, G)
    Wg = Wg / (Wg.amax(dim=-1, keepdim=True) + 1e-6)
    return Wg.reshape(W.shape[0], -1)[:, : W.shape[1]].mean(0)


def search_scales(x_mean: torch.Tensor, W_list: list[torch.Tensor], X: torch.Tensor, fmt: WeightFormat,
                  grid: int = 20, duo_scaling: bool = False) -> ScaleSearch:
    """Grid-search ``alpha`` in ``[0, 1)`` for the per-channel scales of one shared input.

    Args:
        x_mean: mean |x| per input channel over the calibration tokens, (in,).
        W_list: float weights (out_i, in) of every layer fed by that input (e.g. q, k, v).
        X: a sample of the input tokens, (n_tokens, in), on which the loss is evaluated.
        fmt: the format ``Q`` used to evaluate the loss.
        grid: number of alphas, ``alpha = i / grid``.
        duo_scaling: also divide by the normalised weight magnitude (AutoAWQ / llm-compressor).

    Returns:
        :class:`ScaleSearch`. The identity ``s = 1`` is always a candidate and wins ties, so the
        objective is never worse than RTN's.

    Example:
        >>> from modelpress.quant.formats import IntFormat
        >>> W, X = torch.randn(32, 128), torch.randn(256, 128) * torch.linspace(0.1, 10, 128)
        >>> res = search_scales(X.abs().mean(0), [W], X, IntFormat(bits=3, granularity=64))
        >>> res.best_error <= res.table[0][1]  # never worse than s = 1 (RTN)
        True
    """
    x_mean = x_mean.float()
    W_list = [W.float() for W in W_list]
    X = token_basis(X)
    w_mean = weight_mean(torch.cat(W_list, 0), fmt) if duo_scaling else None
    return search_scales_by(lambda s: scaled_output_error(s, W_list, X, fmt), x_mean, grid, w_mean)


def search_scales_by(objective: Callable[[torch.Tensor], float], x_mean: torch.Tensor, grid: int = 20,
                     w_mean: torch.Tensor | None = None) -> ScaleSearch:
    """The alpha grid search of :func:`search_scales` for any ``objective(s) -> loss``.

    The reference AWQ scores a candidate by the output of the whole module the layers sit in
    (attention for q/k/v, the MLP for gate/up): the objective is whatever the caller measures.
    ``s = 1`` is tried first and wins ties.
    """
    alphas: list[float | None] = ([None] if w_mean is not None else []) + [i / grid for i in range(grid)]
    table, best_s, best_err = [], torch.ones_like(x_mean), float("inf")
    for alpha in alphas:
        s = torch.ones_like(x_mean) if alpha is None else candidate_scales(x_mean, alpha, w_mean)
        err = objective(s)
        table.append((alpha, err))
        if err < best_err:  # strict: the identity (first) wins ties
            best_err, best_s = err, s
    return ScaleSearch(best_s, best_err, table)


# ---- clipping search ----------------------------------------------------------------------------
def _fake_quantize_grouped(plan: FitPlan, wg: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest on a grouped view (rows, n_groups, G) with the parameters really stored,
    under the plan's tensor-wide parameters (the same for every candidate and for the final rounding)."""
    p = plan.fit(wg)
    return plan.fmt.decode(plan.fmt.encode(wg, p), p)


def clip_plan(W: torch.Tensor, fmt: WeightFormat) -> FitPlan:
    """The format's tensor-wide parameters (NVFP4's global scale, NF4's double-quantisation
    statistics) fitted once on the unclipped weight ``W`` (out, in): :func:`search_clip` scores every
    candidate under them and :func:`quantize_clipped` rounds the result under them, so each group's
    choice is judged with the parameters it is finally stored with."""
    return fmt.plan(fmt.grouped(W.float()))


def quantize_clipped(Wc: torch.Tensor, plan: FitPlan) -> QTensor:
    """``Wc`` (out, in) quantised under ``plan`` (see :func:`clip_plan`)."""
    fmt = plan.fmt
    return fmt.quantize(Wc, stored=plan.store(plan.fit(fmt.grouped(Wc.float()))))


def search_clip(W: torch.Tensor, X: torch.Tensor, fmt: WeightFormat, n_grid: int = 20,
                max_shrink: float = 0.5, plan: FitPlan | None = None) -> torch.Tensor:
    """Clip each group of ``W`` to ``±max|w| * (1 - i / n_grid)``, ``i`` minimising its output error.

    The error of row ``o``, group ``g`` is ``|| X_g (Q(clip(w_og)) - w_og) ||^2`` over the tokens,
    computed through the per-group Gram matrix ``X_g^T X_g``. ``i = 0`` (no clipping) is a
    candidate and wins ties, so clipping never raises a group's error when the result is rounded
    under the same ``plan`` (:func:`quantize_clipped`). A per-tensor format has a single range for
    the whole weight and is returned unchanged.

    Args:
        W: float weight (out, in), already scaled.
        X: input tokens (n_tokens, in), already divided by the scales.
        fmt: the target format.
        n_grid, max_shrink: ``int(max_shrink * n_grid)`` shrink steps of ``1 / n_grid`` are tried.
        plan: tensor-wide parameters to score under (default: :func:`clip_plan` of ``W``).

    Returns:
        The clipped weight (out, in), float32.
    """
    W = W.float()
    if isinstance(fmt.granularity, PerTensor):
        return W.clone()
    plan = plan if plan is not None else clip_plan(W, fmt)
    Wg = fmt.grouped(W)  # (out, n_groups, G)
    Xg = fmt.grouped(X.float())  # (n, n_groups, G), zero padded like W
    H = torch.einsum("ngk,ngl->gkl", Xg, Xg)  # (n_groups, G, G)
    w_max = Wg.abs().amax(dim=-1, keepdim=True)  # (out, n_groups, 1)
    best_max, best_err = w_max, torch.full_like(w_max, float("inf"))
    for i in range(int(max_shrink * n_grid)):
        m = w_max * (1 - i / n_grid)
        E = _fake_quantize_grouped(plan, torch.clamp(Wg, -m, m)) - Wg  # (out, n_groups, G)
        err = (torch.einsum("ogk,gkl->ogl", E, H) * E).sum(-1, keepdim=True)  # (out, n_groups, 1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better, m, best_max)
    return torch.clamp(Wg, -best_max, best_max).reshape(W.shape[0], -1)[:, : W.shape[1]].contiguous()


# ---- folding: the float function is unchanged ---------------------------------------------------
def fold_into_norm(norm_weight: torch.Tensor, norm_bias: torch.Tensor | None,
                   s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A norm whose output is ``y * weight + bias`` now outputs ``(y * weight + bias) / s``.

    Returns ``(weight / s, bias / s or None)``, each (in,).
    """
    return norm_weight / s, (norm_bias / s if norm_bias is not None else None)


def fold_into_linear_out(prev_W: torch.Tensor, prev_b: torch.Tensor | None,
                         s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The previous linear now outputs ``(x W^T + b) / s``: its output rows are divided by ``s``.

    Args:
        prev_W: (in, in_prev), i.e. (out of the previous linear = input of the next ones, its input).
        prev_b: (in,) or None.
    """
    return prev_W / s.view(-1, 1), (prev_b / s if prev_b is not None else None)


def scale_linear_in(W: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """A consumer of the rescaled input takes ``W * s`` along its input dim, (out, in)."""
    return W * s.view(1, -1)
