"""GPTQ (Frantar et al., 2022, arXiv:2210.17323): pure maths, tensors in, ``QTensor`` out.

Columns of ``W`` are quantised one at a time; the rounding error of column ``q`` is spread over the
not yet quantised columns ``F`` with the OBS update ``w_F -= (w_q - q) / [H_F^-1]_qq * [H_F^-1]_{:,q}``.
Every ``[H_F^-1]`` needed is a row of one upper Cholesky factor ``Hinv`` of ``H^-1``, and updates
are applied lazily, ``blocksize`` columns at a time. Names follow IST-DASLab/gptq's ``gptq.py``.

The format is only used through its contract (a :class:`FitPlan`: tensor-wide parameters once,
group parameters at stored precision, ``encode`` / ``decode``), so every registered format works
and what is stored is exactly what the column loop used.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ....calib.obs import inverse_cholesky_, quantize_column
from ....core.errors import ModelpressError
from ....core.threads import torch_threads
from ...formats.base import FitPlan, Params, QTensor, WeightFormat
from ...granularity import PerGroup

#: Columns whose OBS updates are applied one by one inside a block; the rest of the block receives
#: them batched (see :class:`_ColumnLoop`).
INNER = 16


@dataclass
class GPTQResult:
    """What :func:`gptq_quantize` returns.

    ``Q`` (out, in) float32 equals ``qtensor.dequantize()`` exactly. ``loss`` is the OBS objective
    summed over the weight, ``sum (w - q)^2 / [H_F^-1]_qq / 2``, as the reference code reports it;
    it equals ``tr((W - Q) (H + damp I) (W - Q)^T) / 2``. ``damp_used`` is the relative dampening
    (fraction of ``mean(diag(H))``) that made ``H`` positive definite, ``damp_abs`` the value added
    to the diagonal, ``row_loss`` (out,) the objective per output row (float64). So the output
    error on the calibration inputs, ``tr((W - Q) H (W - Q)^T)``, is ``2 loss - damp_abs ||W - Q||^2``
    without keeping ``H`` (dead columns excluded).
    """

    qtensor: QTensor
    Q: torch.Tensor
    loss: float
    damp_used: float
    damp_abs: float
    row_loss: torch.Tensor
    dead_columns: int
    warnings: list[str] = field(default_factory=list)


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    fmt: WeightFormat,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = True,
    own_H: bool = False,
) -> GPTQResult:
    """Quantise ``W`` (out, in) to ``fmt`` minimising ``||(W - Q) X^T||^2`` for ``H = 2 X^T X / n``.

    Args:
        W: weight (out, in); computed in float64 if given float64, else float32.
        H: Hessian (in, in) on W's device, e.g. ``HessianAccumulator.H``.
        fmt: any weight format. Per-channel / per-tensor parameters are fitted once on ``W``;
            ``PerGroup`` parameters are fitted when the column loop reaches a group, on the
            weights updated so far (the result does not depend on ``blocksize``).
        blocksize: columns per lazy batch update.
        percdamp: ``percdamp * mean(diag(H))`` is added to the diagonal; raised tenfold (up to
            ``MAX_DAMP_RETRIES`` times) while ``H`` is not positive definite, with a warning.
        act_order: process columns by descending ``diag(H)``.
        static_groups: with ``act_order`` and ``PerGroup``, fit every group's parameters up front
            on the original ``W`` so that the stored layout stays the ordinary one (no g_idx);
            ``False`` is refused there. Without ``act_order`` it has no effect.
        own_H: the caller hands ``H`` over (keeps no reference): it is factorised in place and
            freed as soon as the inverse exists, instead of copied (one n x n matrix less).

    Returns:
        :class:`GPTQResult`; ``result.qtensor`` is in the original column order.

    Example:
        >>> from modelpress.quant.formats.integer import IntFormat
        >>> fmt = IntFormat(bits=4, granularity=PerGroup(size=64))
        >>> X = torch.randn(512, 256)                     # (tokens, in)
        >>> res = gptq_quantize(torch.randn(128, 256), 2 * X.T @ X / 512, fmt)
        >>> torch.equal(res.qtensor.dequantize(), res.Q)
        True
    """
    _check_inputs(W, H, blocksize, percdamp)
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    rows, columns = W.shape
    warnings: list[str] = []
    # Column-major working copy (the caller's W is never written): the loop reads and updates
    # whole columns, which are contiguous rows here (about 2x faster than strided column access).
    WT = W.detach().T.to(dtype).contiguous()  # (columns, rows)

    # A column no calibration input ever reached carries no information: zero it, keep H invertible.
    dead = torch.diag(H) == 0
    WT[dead] = 0
    if dead.any():
        warnings.append(f"{int(dead.sum())} dead input columns (diag(H) == 0) were set to zero")

    groupsize = fmt.granularity.size if isinstance(fmt.granularity, PerGroup) else columns
    dynamic = isinstance(fmt.granularity, PerGroup) and not act_order
    if act_order and isinstance(fmt.granularity, PerGroup) and not static_groups:
        raise ModelpressError("gptq: act_order with per-group parameters needs static_groups=True")
    # tensor-wide parameters (NVFP4's global scale, NF4's double quantisation) once, on W; group
    # parameters (rows | 1, n_groups, 1) up front too, unless fitted as the loop reaches each group
    plan = fmt.plan(fmt.grouped(WT.T))
    params = None if dynamic else plan.fit(fmt.grouped(WT.T))

    perm = torch.arange(columns, device=W.device)
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        WT = WT[perm]
    group_of = (perm // groupsize).tolist()  # original group of each processed column

    # (columns, columns) working copy of H in processing order, dead columns fixed; H itself if owned
    if act_order:
        Hw = H.detach().to(dtype)[perm[:, None], perm[None, :]]
    else:
        Hw = H.detach().to(dtype)
        if not (own_H and Hw.data_ptr() == H.data_ptr() and H.device.type == "cpu"):
            Hw = Hw.clone()  # (an owned float32 CPU H is factorised in place, shared storage)
    del H
    Hw[dead[perm], dead[perm]] = 1
    mean_diag = float(torch.diag(Hw).mean())
    Hinv, damp_used = inverse_cholesky_(Hw, percdamp, warnings)
    del Hw
    damp_abs = damp_used * mean_diag

    QT = torch.zeros(columns, rows, dtype=torch.float32, device=WT.device)
    codesT = torch.zeros(columns, rows, dtype=torch.uint8, device=WT.device)
    row_loss = torch.zeros(rows, dtype=torch.float64, device=WT.device)  # OBS objective per output row
    static = None if dynamic else [_group_params(params, g) for g in range(params_groups(params))]
    step = math.gcd(blocksize, groupsize, INNER) if dynamic else min(blocksize, INNER)
    loop = _ColumnLoop(Hinv, plan, static, group_of, groupsize, blocksize, step, dynamic)
    # One thread for the column loop: its ops are tiny, so torch's threads only spin-wait, and row
    # chunks on Python threads were measured 3x slower (they serialise on the GIL between ops).
    with torch_threads(1):
        fitted = loop.run(WT, QT, codesT, row_loss)

    if dynamic:  # (rows, n_groups, 1) per parameter
        params = {k: torch.cat([p[k] for p in fitted], dim=1) for k in fitted[0]}
    del WT, Hinv
    if act_order:  # back to the original column order (each a single copy, the permuted one freed)
        invperm = torch.argsort(perm)
        QT, codesT = QT[invperm], codesT[invperm]
    qtensor = QTensor(fmt, (rows, columns), codesT.T.contiguous(), plan.store(params))
    del codesT
    return GPTQResult(qtensor, QT.T, float(row_loss.sum()), damp_used, damp_abs, row_loss,
                      int(dead.sum()), warnings)


@dataclass
class _ColumnLoop:
    """GPTQ's column loop over ``WT`` (columns, rows), writing their codes and values.

    Within each ``blocksize`` block the OBS updates of a column reach the next ``step - 1``
    columns one by one (rank-1) and the rest of the block once per ``step`` columns (one matmul
    for ``step`` columns' errors, the same sums with far less memory traffic); later blocks get
    the block's update once, lazily, as in the reference. Group starts fall on step boundaries,
    so a group is fitted on weights with every earlier update applied.
    """

    Hinv: torch.Tensor  # (columns, columns) upper Cholesky factor of H^-1, processing order
    plan: FitPlan
    static: list[Params] | None  # per original group: parameters fitted up front (rows | 1, 1, 1)
    group_of: list[int]  # original group of each processed column
    groupsize: int
    blocksize: int
    step: int
    dynamic: bool

    def run(self, WT: torch.Tensor, QT: torch.Tensor, codesT: torch.Tensor, row_loss: torch.Tensor) -> list[Params]:
        """Quantise every column of ``WT`` (updated in place); returns the dynamically fitted groups."""
        fitted: list[Params] = []
        columns = WT.shape[0]
        for i1 in range(0, columns, self.blocksize):
            i2 = min(i1 + self.blocksize, columns)
            W1 = WT[i1:i2].clone()  # (count, rows)
            Err1 = torch.zeros_like(W1)  # (count, rows): (w - q) / d per column
            for j1 in range(0, i2 - i1, self.step):
                self._steps(WT, W1, Err1, QT, codesT, i1, j1, min(j1 + self.step, i2 - i1), fitted)
            row_loss += Err1.pow(2).sum(0).double() / 2  # Losses1 = (w - q)^2 / d^2
            WT[i2:] -= self.Hinv[i1:i2, i2:].T.matmul(Err1)  # the lazy batch update
        return fitted

    def _steps(self, WT: torch.Tensor, W1: torch.Tensor, Err1: torch.Tensor, QT: torch.Tensor,
               codesT: torch.Tensor, i1: int, j1: int, j2: int, fitted: list[Params]) -> None:
        """Columns ``i1 + j1 .. i1 + j2`` one by one, then their update of the rest of the block."""
        Hinv1 = self.Hinv[i1:i1 + W1.shape[0], i1:i1 + W1.shape[0]]  # (count, count)
        for i in range(j1, j2):
            w = W1[i]  # (rows,)
            if self.dynamic and (i1 + i) % self.groupsize == 0:
                j = min(i1 + i + self.groupsize, WT.shape[0])
                Wg = _current_columns(WT, W1, Err1, self.Hinv, i1, i, j)
                Wg = F.pad(Wg.T, (0, self.groupsize - Wg.shape[0]))  # (rows, G), zero padded as fmt.grouped does
                fitted.append(self.plan.fit(Wg.unsqueeze(1), first_group=(i1 + i) // self.groupsize))
            p = fitted[-1] if self.dynamic else self.static[self.group_of[i1 + i]]
            c, q = quantize_column(self.plan.fmt, w, p)
            codesT[i1 + i] = c
            QT[i1 + i] = q
            err1 = torch.sub(w, q.to(w.dtype), out=Err1[i]).div_(Hinv1[i, i])  # (rows,)
            if i + 1 < j2:
                W1[i + 1:j2] -= Hinv1[i, i + 1:j2].unsqueeze(1) * err1.unsqueeze(0)  # rank-1 OBS update
        if j2 < W1.shape[0]:
            W1[j2:] -= Hinv1[j1:j2, j2:].T.matmul(Err1[j1:j2])  # the step's columns, batched


def params_groups(params: Params) -> int:
    """Number of groups in fitted parameters (rows | 1, n_groups, 1)."""
    return max(v.shape[1] for v in params.values())


def _check_inputs(W: torch.Tensor, H: torch.Tensor, blocksize: int, percdamp: float) -> None:
    if W.dim() != 2 or W.numel() == 0:
        raise ModelpressError(f"gptq expects a non-empty 2-D weight, got shape {tuple(W.shape)}")
    if H.shape != (W.shape[1], W.shape[1]):
        raise ModelpressError(f"gptq: Hessian shape {tuple(H.shape)} does not match weight {tuple(W.shape)}")
    if H.device != W.device:
        raise ModelpressError(f"gptq: weight on {W.device} but Hessian on {H.device}")
    if not torch.isfinite(H).all():
        raise ModelpressError("gptq: the Hessian contains NaN or inf")
    if blocksize < 1 or percdamp < 0:
        raise ModelpressError(f"gptq: need blocksize >= 1 and percdamp >= 0, got {blocksize}, {percdamp}")


def _current_columns(WT: torch.Tensor, W1: torch.Tensor, Err1: torch.Tensor, Hinv: torch.Tensor,
                     i1: int, i: int, j2: int) -> torch.Tensor:
    """Columns ``i1 + i .. j2`` of W with every update so far applied, as rows: (j2 - i1 - i, rows).

    Columns past the current block have not yet received this block's lazy update; apply the part
    owed by its first ``i`` columns so a group straddling blocks is fitted on the same weights
    whatever the blocksize.
    """
    i2 = i1 + W1.shape[0]
    inside = W1[i : min(j2, i2) - i1]
    if j2 <= i2:
        return inside
    outside = WT[i2:j2] - Hinv[i1 : i1 + i, i2:j2].T.matmul(Err1[:i])
    return torch.cat([inside, outside], dim=0)


def _group_params(params: Params, g: int) -> Params:
    """Parameters of group ``g``, each (rows | 1, 1, 1)."""
    return {k: v.narrow(1, g, 1) if v.shape[1] > 1 else v for k, v in params.items()}


