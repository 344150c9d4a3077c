"""SparseGPT (Frantar & Alistarh, 2023, arXiv:2301.00774): pure maths, tensors in, tensors out.

Columns are processed left to right. Within each block of ``blocksize`` columns the mask is chosen
adaptively from the OBS saliency ``w^2 / [H^-1]_cc^2`` (unstructured: the lowest of the whole
block; N:M: the lowest ``m - n`` of every ``m`` columns, chosen when the loop reaches them). Column
``c`` is then replaced by its target ``q`` (0 where pruned, the weight itself where kept, or its
quantised value for joint quantisation) and the error is spread over the columns not yet processed
with the OBS update ``w_F -= (w_c - q_c) / [H_F^-1]_cc * [H_F^-1]_{c,F}``; rows of one upper Cholesky
factor of ``H^-1`` hold every ``[H_F^-1]`` needed. Names follow IST-DASLab/sparsegpt's ``fasterprune``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ....calib.obs import inverse_cholesky_, quantize_column
from ....core.errors import ModelpressError
from ....core.threads import torch_threads
from ....quant.formats.base import FitPlan, Params, QTensor, WeightFormat
from ....quant.granularity import PerGroup
from ...masks import _prune_lowest
from ...patterns import NM, SparsityPattern, Unstructured

@dataclass
class SparseGPTResult:
    """What :func:`sparsegpt_prune` returns.

    ``W`` (out, in) float32 is the pruned (and, with a format, quantised) weight, exactly zero where
    ``mask`` is False; ``qtensor`` (joint quantisation only) dequantises to exactly ``W``. ``loss``
    is the OBS objective ``sum (w - q)^2 / [H_F^-1]_cc / 2``.
    """

    W: torch.Tensor
    mask: torch.Tensor
    loss: float
    damp_used: float
    qtensor: QTensor | None = None
    warnings: list[str] = field(default_factory=list)


def sparsegpt_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    pattern: SparsityPattern,
    sparsity: float | None = None,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    fmt: WeightFormat | None = None,
    mask: torch.Tensor | None = None,
) -> SparseGPTResult:
    """Prune ``W`` (out, in) to ``pattern`` minimising ``||(W - W') X^T||^2`` for ``H = 2 X^T X / n``.

    Args:
        W: weight (out, in); float64 in, float64 maths (else float32).
        H: Hessian (in, in) on W's device.
        pattern: ``Unstructured`` (needs ``sparsity``) or ``NM``.
        sparsity: fraction of zeros for unstructured; exactly ``round(s * numel)`` weights are pruned.
        blocksize: columns per adaptive mask selection and lazy batch update.
        percdamp: ``percdamp * mean(diag(H))`` added to the diagonal (raised tenfold while not PD).
        fmt: joint quantisation: every kept weight is rounded to ``fmt`` in the same pass (GPTQ).
        mask: a fixed keep-mask (out, in) instead of adaptive selection.

    Example:
        >>> X = torch.randn(256, 64)
        >>> res = sparsegpt_prune(torch.randn(32, 64), 2 * X.T @ X / 256, NM(2, 4))
        >>> int((res.W.reshape(32, 16, 4) == 0).sum(-1).min())
        2
    """
    _check(W, H, pattern, sparsity, mask, blocksize)
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    W = W.detach().to(dtype).clone()  # (rows, columns)
    H = H.detach().to(dtype).clone()  # (columns, columns)
    rows, columns = W.shape
    warnings: list[str] = []

    dead = torch.diag(H) == 0  # inputs never seen: no information, keep H invertible
    H[dead, dead] = 1
    W[:, dead] = 0
    if dead.any():
        warnings.append(f"{int(dead.sum())} dead input columns (diag(H) == 0) were set to zero")

    groupsize = fmt.granularity.size if fmt is not None and isinstance(fmt.granularity, PerGroup) else columns
    dynamic = fmt is not None and isinstance(fmt.granularity, PerGroup)
    plan = fmt.plan(fmt.grouped(W)) if fmt is not None else None  # tensor-wide parameters, once
    params = plan.fit(fmt.grouped(W)) if plan is not None and not dynamic else None
    fitted: list[Params] = []
    codes = torch.zeros(rows, columns, dtype=torch.uint8, device=W.device) if fmt is not None else None

    Hinv, damp_used = inverse_cholesky_(H.contiguous(), percdamp, warnings, who="sparsegpt")
    del H

    keep = torch.ones(rows, columns, dtype=torch.bool, device=W.device)
    pruned = 0
    loss = 0.0

    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1

        W1 = W[:, i1:i2].clone()  # (rows, count)
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]  # (count, count)
        d1 = torch.diag(Hinv1)  # (count,)

        if mask is not None:
            mask1 = ~mask[:, i1:i2].to(W.device)  # True = prune
        elif isinstance(pattern, Unstructured):
            k = round(sparsity * rows * i2) - pruned  # cumulative rounding: exact count for the layer
            tmp = W1**2 / d1.reshape(1, -1) ** 2  # (rows, count) OBS saliency
            mask1 = _lowest(tmp.reshape(1, -1), k).reshape(rows, count)
            pruned += k
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)

        with torch_threads(1):  # tiny per-column ops: one thread avoids OpenMP spin-waits
            for i in range(count):
                w = W1[:, i]  # (rows,)
                d = Hinv1[i, i]

                if isinstance(pattern, NM) and mask is None and i % pattern.m == 0:
                    tmp = W1[:, i:i + pattern.m] ** 2 / d1[i:i + pattern.m].reshape(1, -1) ** 2  # (rows, m)
                    mask1[:, i:i + pattern.m] = _lowest(tmp, pattern.m - pattern.n)

                q = w.clone()
                q[mask1[:, i]] = 0
                if fmt is not None:
                    if dynamic and (i1 + i) % groupsize == 0:
                        fitted.append(_fit_group(plan, W, W1, Err1, Hinv, mask1, i1, i, groupsize))
                    c, qv = quantize_column(fmt, q, fitted[-1] if dynamic else params)
                    q = torch.where(mask1[:, i], torch.zeros_like(qv), qv).to(dtype)
                    codes[:, i1 + i] = c

                Q1[:, i] = q
                Losses1[:, i] = (w - q) ** 2 / d**2
                err1 = (w - q) / d  # (rows,)
                W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
                Err1[:, i] = err1

        W[:, i1:i2] = Q1
        keep[:, i1:i2] = ~mask1
        loss += float(Losses1.sum()) / 2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])  # the lazy batch update

    qt = None
    if fmt is not None:
        qt = _qtensor(plan, codes, fitted if dynamic else None, params, keep, (rows, columns))
    return SparseGPTResult(W.to(torch.float32), keep, loss, damp_used, qt, warnings)


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool (rows, n): True at the ``k`` lowest entries of each row (ties by position)."""
    return ~_prune_lowest(scores, k)


def _fit_group(plan: FitPlan, W: torch.Tensor, W1: torch.Tensor, Err1: torch.Tensor, Hinv: torch.Tensor,
               mask1: torch.Tensor, i1: int, i: int, groupsize: int) -> Params:
    """Parameters of the group starting at column ``i1 + i``, fitted on the weights updated so far.

    Columns past the current block still owe this block's lazy update for its first ``i`` columns
    (as in GPTQ, so the result does not depend on ``blocksize``); weights already known to be pruned
    count as zero.
    """
    columns, i2 = W.shape[1], i1 + W1.shape[1]
    j2 = min(i1 + i + groupsize, columns)
    inside = W1[:, i:min(j2, i2) - i1] * ~mask1[:, i:min(j2, i2) - i1]
    if j2 > i2:
        inside = torch.cat([inside, W[:, i2:j2] - Err1[:, :i].matmul(Hinv[i1:i1 + i, i2:j2])], dim=1)
    Wg = F.pad(inside, (0, groupsize - inside.shape[1]))  # (rows, G): short last group zero padded
    return plan.fit(Wg.unsqueeze(1), first_group=(i1 + i) // groupsize)


def _qtensor(plan: FitPlan, codes: torch.Tensor, fitted: list[Params] | None, params: Params | None,
             keep: torch.Tensor, shape: tuple[int, int]) -> QTensor:
    """Joint result as a QTensor; pruned weights get the code of 0 (refused if 0 is not on the grid)."""
    fmt = plan.fmt
    if fitted is not None:
        params = {k: torch.cat([p[k] for p in fitted], dim=1) for k in fitted[0]}  # (rows, n_groups, 1)
    qt = QTensor(fmt, shape, codes, plan.store(params))
    if not bool((qt.dequantize()[~keep] == 0).all()):
        raise ModelpressError(f"sparsegpt: format {fmt.to_dict()} cannot store an exact 0 for pruned weights")
    return qt


def _check(W: torch.Tensor, H: torch.Tensor, pattern: SparsityPattern, sparsity: float | None,
           mask: torch.Tensor | None, blocksize: int = 128) -> None:
    if W.dim() != 2 or W.numel() == 0:
        raise ModelpressError(f"sparsegpt expects a non-empty 2-D weight, got shape {tuple(W.shape)}")
    if isinstance(pattern, NM) and mask is None and blocksize % pattern.m:
        raise ModelpressError(f"sparsegpt: {pattern.n}:{pattern.m} needs a blocksize that is a multiple of "
                              f"{pattern.m} (groups of {pattern.m} must not straddle blocks), got {blocksize}")
    if H.shape != (W.shape[1], W.shape[1]):
        raise ModelpressError(f"sparsegpt: Hessian shape {tuple(H.shape)} does not match weight {tuple(W.shape)}")
    if not torch.isfinite(H).all():
        raise ModelpressError("sparsegpt: the Hessian contains NaN or inf")
    if mask is not None:
        if mask.shape != W.shape:
            raise ModelpressError(f"sparsegpt: mask shape {tuple(mask.shape)} does not match weight {tuple(W.shape)}")
        return
    if isinstance(pattern, Unstructured):
        if sparsity is None or not 0 <= sparsity < 1:
            raise ModelpressError(f"sparsegpt: unstructured pruning needs a sparsity in [0, 1), got {sparsity}")
    elif not isinstance(pattern, NM):
        raise ModelpressError(f"sparsegpt supports unstructured and N:M patterns, not {pattern.type}")
