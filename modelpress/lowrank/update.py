"""SVD-LLM's layer-wise closed-form update as a block-reconstruction stage: ``svdllm-update``.

Each selected layer is first truncated exactly as ``svdllm`` does (Cholesky whitening by the Gram
matrix of the inputs it now sees, X_c), then its left factor B is refitted in closed form so that
``B A`` applied to X_c reproduces the *float* layer applied to the *float* stream's inputs X_f for the
same tokens (:func:`refit_left`). Whitening alone fits ``W X_c``: once earlier layers and blocks are
compressed, X_c has drifted from X_f and that target carries the drift forward; the refit pulls each
layer back towards the float model's outputs.

It is a reconstruction stage because it needs both streams: the runner hands it the float stream
into the block (``ctx.float_inputs``) and the float reference block; the two blocks are walked in
step, batch by batch, accumulating ``G_c = X_c^T X_c``, ``C = X_f^T X_c`` and ``G_f = X_f^T X_f``
per input set (q/k/v share one input: one set of statistics). Groups follow the architecture's
true-sequential order, so a later group sees the earlier ones already factorised.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from ..calib.blocks import BlockInputs, last_module
from ..calib.capture import capture_inputs
from ..calib.observed import layer_groups, shared_input_sets
from ..core.errors import ModelpressError
from ..core.method import METHODS, MethodEntry, StageContext, StageKind
from ..models.layers import linear_shape
from ..models.loading import LoadedModel
from ..models.selection import layer_weight, select_layers
from .factor import Factors, whitened_factor
from .method import SVDLLMConfig, install_factors, plan_ranks
from .ranks import rank_rule


def refit_left(W: torch.Tensor, A: torch.Tensor, cross: torch.Tensor, G: torch.Tensor,
               damp: float = 1e-8) -> torch.Tensor:
    """SVD-LLM's layer-wise closed-form update: the B (out, r) minimising ``||X_f W^T - X_c A^T B^T||_F``
    with A (r, in) fixed, where X_f are the float layer's inputs and X_c the compressed model's for the
    same tokens.

    Why: after earlier layers are compressed a layer sees shifted inputs X_c; refitting B anchors its
    outputs to the float layer's on the float stream instead of to W applied to the shifted inputs.
    The normal equations give ``B = W C A^T (A G A^T)^-1`` with ``C = X_f^T X_c`` (``cross``) and
    ``G = X_c^T X_c`` (both (in, in), any common scale). ``damp`` x mean diagonal is added to the
    (r, r) system so a rank-deficient calibration set stays solvable.

    Example:
        >>> Xf, Xc = torch.randn(64, 5), torch.randn(64, 5); W, A = torch.randn(3, 5), torch.randn(2, 5)
        >>> B = refit_left(W, A, Xf.T @ Xc, Xc.T @ Xc)
        >>> ref = torch.linalg.lstsq(Xc @ A.T, Xf @ W.T).solution.T
        >>> torch.allclose(B, ref, atol=1e-4)
        True
    """
    W64, A64 = W.double(), A.double()
    M = A64 @ G.double() @ A64.T  # (r, r)
    M = M + damp * float(M.diagonal().mean().clamp_min(1e-300)) * torch.eye(M.shape[0], dtype=M.dtype)
    rhs = W64 @ cross.double() @ A64.T  # (out, r)
    B = torch.linalg.solve(M, rhs.T).T  # M symmetric: B M = rhs
    return B.to(W.dtype)


def anchored_rel_error(W: torch.Tensor, M: torch.Tensor, Gf: torch.Tensor, cross: torch.Tensor,
                       Gc: torch.Tensor) -> float:
    """``||X_f W^T - X_c M^T||_F / ||X_f W^T||_F`` from the second moments ``Gf = X_f^T X_f``,
    ``cross = X_f^T X_c``, ``Gc = X_c^T X_c``: the layer's output error against the float layer on the
    float stream (M the dense weight the compressed layer computes)."""
    W, M = W.double(), M.double()
    ref = torch.einsum("oi,ij,oj->", W, Gf.double(), W)
    err = ref - 2 * torch.einsum("oi,ij,oj->", W, cross.double(), M) + torch.einsum("oi,ij,oj->", M, Gc.double(), M)
    return float((err.clamp_min(0) / ref.clamp_min(1e-300)).sqrt())


class SVDLLMUpdateConfig(SVDLLMConfig):
    """SVD-LLM with its layer-wise closed-form update (whitening, then B refitted against the float layer).

    Example:
        >>> SVDLLMUpdateConfig(param_ratio=0.8).method
        'svdllm-update'
    """

    method: Literal["svdllm-update"] = "svdllm-update"  # type: ignore[assignment]
    refit_dampening: float = Field(1e-8, ge=0, lt=1, description="ridge term of the refit, as a fraction of the "
                                                                 "mean diagonal of A G A^T")


class _Moments:
    """Sums of ``X_c^T X_c``, ``X_f^T X_c`` and ``X_f^T X_f`` over paired tokens, float64 (in, in)."""

    def __init__(self, d: int) -> None:
        self.Gc = torch.zeros(d, d, dtype=torch.float64)
        self.C = torch.zeros(d, d, dtype=torch.float64)
        self.Gf = torch.zeros(d, d, dtype=torch.float64)
        self.ntokens = 0

    def update(self, xf: torch.Tensor, xc: torch.Tensor) -> None:
        d = self.Gc.shape[0]
        # one batch's products in float32 (float64 matmuls cost ~2x), summed across batches in float64
        Xf, Xc = xf.reshape(-1, d).float(), xc.reshape(-1, d).float()  # (tokens, in)
        self.Gc += (Xc.T @ Xc).double()
        self.C += (Xf.T @ Xc).double()
        self.Gf += (Xf.T @ Xf).double()
        self.ntokens += Xc.shape[0]


class SVDLLMUpdateStage:
    """Reconstruction stage: per true-sequential group, one paired pass (float block on the float
    stream, compressed block on the compressed stream), then each layer whitened, truncated, refitted."""

    def __init__(self, cfg: SVDLLMUpdateConfig, selected: list[str], planned: dict[str, int] | None) -> None:
        self.cfg, self.selected, self.planned = cfg, set(selected), planned

    def process_block(self, lm: LoadedModel, index: int, block: nn.Module, prefix: str, inputs: BlockInputs,
                      ctx: StageContext, targets: torch.Tensor) -> None:
        floats: BlockInputs | None = ctx.float_inputs
        if floats is None or ctx.reference is None:
            raise ModelpressError("svdllm-update needs the float stream and the float reference (a reconstruction pass)")
        names = [n for n in sorted(self.selected) if n.startswith(prefix + ".")]
        if not names:
            return
        fblock = ctx.reference.block(index)
        for group in layer_groups(lm.spec, prefix, names, self.cfg.true_sequential):
            mods = {n: lm.module.get_submodule(n) for n in group}
            fmods = {n: fblock.get_submodule(n[len(prefix) + 1:]) for n in group}
            sets = shared_input_sets(lm.spec, prefix, group)
            moments = {s[0]: _Moments(linear_shape(mods[s[0]])[1]) for s in sets}
            self._paired_pass(block, fblock, inputs, floats, {n: mods[n] for n in moments},
                              {n: fmods[n] for n in moments}, moments)
            for s in sets:
                self._factor_set(lm, {n: mods[n] for n in s}, {n: fmods[n] for n in s}, moments.pop(s[0]), ctx)

    @staticmethod
    def _paired_pass(block: nn.Module, fblock: nn.Module, inputs: BlockInputs, floats: BlockInputs,
                     mods: dict[str, nn.Module], fmods: dict[str, nn.Module], moments: dict[str, _Moments]) -> None:
        """Batch by batch: the float block's layer inputs and the compressed block's, paired by token."""
        stop_c, stop_f = last_module(block, mods.values()), last_module(fblock, fmods.values())
        seen_f: dict[str, torch.Tensor] = {}
        seen_c: dict[str, torch.Tensor] = {}
        for b in range(inputs.n_batches):
            seen_f.clear()
            seen_c.clear()
            with capture_inputs(fmods, lambda n, x: seen_f.setdefault(n, x.detach())):
                floats.forward_batch(fblock, b, stop_before=stop_f)
            with capture_inputs(mods, lambda n, x: seen_c.setdefault(n, x.detach())):
                inputs.forward_batch(block, b, stop_before=stop_c)
            for n, acc in moments.items():
                acc.update(seen_f[n].float(), seen_c[n].float())
            inputs.release(b * inputs.batch_size, (b + 1) * inputs.batch_size)
            floats.release(b * floats.batch_size, (b + 1) * floats.batch_size)

    def _factor_set(self, lm: LoadedModel, mods: dict[str, nn.Module], fmods: dict[str, nn.Module], m: _Moments,
                    ctx: StageContext) -> None:
        n = max(m.ntokens, 1)
        Gc, C, Gf = m.Gc / n, m.C / n, m.Gf / n
        for name, module in mods.items():
            W = layer_weight(name, module)  # (out, in): what the compressed model holds now
            Wf = layer_weight(name, fmods[name])  # the float layer: the target
            rank = rank_rule(self.cfg, name, tuple(W.shape), self.planned)
            f = whitened_factor(W, Gc, rank, self.cfg.dampening)
            before = anchored_rel_error(Wf, f.B @ f.A, Gf, C, Gc)
            B = refit_left(Wf, f.A, C, Gc, self.cfg.refit_dampening)
            after = anchored_rel_error(Wf, B @ f.A, Gf, C, Gc)
            install_factors(lm, name, module, W, Factors(B, f.A, f.sigma, f.notes), self.cfg.method, ctx, after)
            ctx.layers[-1].notes.append(f"closed-form update: output error vs the float layer on the float stream "
                                        f"{before:.4g} -> {after:.4g}")


def svdllm_update_stage(lm: LoadedModel, cfg: SVDLLMUpdateConfig) -> SVDLLMUpdateStage:
    layers = select_layers(lm, cfg)
    return SVDLLMUpdateStage(cfg, [n for n, _ in layers], plan_ranks(layers, cfg))


METHODS.register("svdllm-update")(MethodEntry(
    SVDLLMUpdateConfig, None, needs_calibration=True, block_stage=svdllm_update_stage, kind=StageKind.RECONSTRUCTION,
    summary="SVD-LLM + layer-wise closed-form update: whitened truncation, then B refitted to the float layer's outputs"))
