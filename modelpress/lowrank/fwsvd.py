"""``fwsvd``: Fisher-weighted SVD (Hsu et al., 2022, "Language model compression with weighted
low-rank factorization"), a whole-model stage with gradients.

The Fisher information of a weight is estimated by its squared loss gradient summed over the
calibration data; FWSVD sums it over each output row, ``I_i = sum_b sum_j (dL_b/dW_ij)^2``, and
factorises ``diag(sqrt I) W`` (``factor.scaled_factor`` with a row scale), which minimises
``sum_i I_i ||W_i - W'_i||^2``: rows the task loss is sensitive to are kept more faithfully.

``L_b`` is the model's next-token cross-entropy on a mini-batch of ``batch_size`` calibration
sequences. ``batch_size: 1`` (the default) squares per-sequence gradients, the paper's per-sample
estimate; larger batches square the batch-mean gradient, the usual cheaper estimate (fewer, larger
passes; cross-sample terms no longer cancel, so it is a noisier, smaller Fisher). Only the selected
weights require gradients, and each one's gradient is reduced to its (out,) row sums as soon as it
is accumulated, then freed: the pass holds activations, not a second copy of the weights.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from ..core.errors import ModelpressError
from ..core.method import METHODS, MethodEntry, StageContext, StageKind
from ..eval.perplexity import logits_of
from ..models.layers import is_conv1d, linear_shape
from ..models.loading import LoadedModel
from ..models.selection import layer_weight, select_layers
from .factor import Factors, fisher_scale, scaled_factor, svd_factor
from .method import install_factors, plan_ranks
from .ranks import RankConfig, rank_rule


class FWSVDConfig(RankConfig):
    """FWSVD: rows scaled by the square root of their Fisher information before the SVD.

    Example:
        >>> FWSVDConfig(param_ratio=0.8).batch_size
        1
    """

    method: Literal["fwsvd"] = "fwsvd"
    batch_size: int = Field(1, ge=1, description="calibration sequences per gradient; 1 = per-sample Fisher "
                                                 "(the paper's), more = squared mini-batch gradients (cheaper)")


def next_token_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``model`` on ids (batch, seq): the causal-LM loss."""
    logits = logits_of(model, ids)  # (batch, seq, vocab)
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())


def row_fisher(model: nn.Module, layers: dict[str, nn.Module], ids: torch.Tensor,
               batch_size: int) -> dict[str, torch.Tensor]:
    """Per-row Fisher information ``I`` (out,) of each layer's weight, float64.

    ``I_i = sum over mini-batches b of sum_j (dL_b / dW_ij)^2`` with ``W`` in (out, in) layout and
    ``L_b`` :func:`next_token_loss` on ``ids[b*batch_size:(b+1)*batch_size]`` (ids: (n, seq)). Only
    these weights get gradients; the model's other parameters and its train/eval mode are restored.

    Example:
        >>> I = row_fisher(model, {"model.layers.0.mlp.down_proj": down}, calib, 1)  # doctest: +SKIP
    """
    owners: dict[int, list[str]] = {}  # id(weight) -> the layers computing with it (a tied weight counts once)
    for name, m in layers.items():
        owners.setdefault(id(m.weight), []).append(name)
    fisher = {n: torch.zeros(linear_shape(m)[0], dtype=torch.float64) for n, m in layers.items()}
    params = list(model.parameters())
    saved = [p.requires_grad for p in params]
    was_training = model.training
    handles = []
    try:
        model.eval()  # no dropout: the Fisher of the model as it will run
        for p in params:
            p.requires_grad_(id(p) in owners)
        for names in owners.values():
            m = layers[names[0]]
            handles.append(m.weight.register_post_accumulate_grad_hook(_reducer(m, [fisher[n] for n in names])))
        with torch.enable_grad():
            for s in range(0, ids.shape[0], batch_size):
                next_token_loss(model, ids[s:s + batch_size]).backward()
    finally:
        for h in handles:
            h.remove()
        for p, req in zip(params, saved):
            p.grad = None
            p.requires_grad_(req)
        model.train(was_training)
    return fisher


def _reducer(module: nn.Module, sinks: list[torch.Tensor]):
    """Hook: add the gradient's squared row sums to each sink, then free the gradient."""
    def hook(w: torch.Tensor) -> None:
        g = w.grad.detach()  # stored layout: (out, in), or (in, out) for HF Conv1D
        rows = g.double().pow(2).sum(0 if is_conv1d(module) else 1).cpu()  # (out,)
        for sink in sinks:
            sink += rows
        w.grad = None
    return hook


def _check_inputs(lm: LoadedModel, ctx: StageContext) -> torch.Tensor:
    """The calibration ids, refused where FWSVD has no loss to differentiate."""
    if ctx.calib is None:
        raise ModelpressError("fwsvd needs calibration data for its gradients: pass --calib FILE")
    if ctx.calib.dim() != 2 or ctx.calib.shape[1] < 2:
        raise ModelpressError(f"fwsvd needs calibration sequences of >= 2 tokens (next-token loss); got ids of "
                              f"shape {tuple(ctx.calib.shape)}")
    if lm.spec is not None and lm.spec.lm_head is None:
        raise ModelpressError(f"fwsvd needs a causal language model (its Fisher comes from the next-token loss); "
                              f"{lm.spec.name} models are encoders")
    return ctx.calib.to(ctx.device)


def run_fwsvd(lm: LoadedModel, cfg: FWSVDConfig, ctx: StageContext) -> None:
    """Gather each selected layer's row Fisher in one gradient pass, then factorise every layer."""
    ids = _check_inputs(lm, ctx)
    layers = select_layers(lm, cfg)
    planned = plan_ranks(layers, cfg)
    fisher = row_fisher(lm.module, dict(layers), ids, cfg.batch_size)
    with torch.no_grad():
        for name, module in ctx.iterate(layers, "FWSVD"):
            W = layer_weight(name, module)  # (out, in)
            rank = rank_rule(cfg, name, tuple(W.shape), planned)
            I = fisher[name]  # (out,)
            if not bool(torch.isfinite(I).all()):
                raise ModelpressError(f"{name}: its loss gradients are not finite (NaN/Inf); cannot weight its rows")
            if not bool((I > 0).any()):
                ctx.warn(f"{name}: received no loss gradient; factorised by plain SVD instead")
                install_factors(lm, name, module, W, svd_factor(W, rank), "svd(fallback)", ctx)
                continue
            f = scaled_factor(W, None, rank, row=fisher_scale(I))
            install_factors(lm, name, module, W, f, "fwsvd", ctx)
            ctx.layers[-1].notes.append(f"Fisher-weighted relative error {weighted_rel_error(f):.4g}")


def weighted_rel_error(f: Factors) -> float:
    """``sqrt(sum_i I_i ||W_i - W'_i||^2 / sum_i I_i ||W_i||^2)``: the tail of the row-scaled spectrum."""
    total = float(f.sigma.double().pow(2).sum())
    return (f.truncation_loss() / max(total, 1e-300)) ** 0.5


METHODS.register("fwsvd")(MethodEntry(
    FWSVDConfig, run_fwsvd, kind=StageKind.TRAINING, grad=True, needs_calibration=True,
    summary="FWSVD: SVD of diag(sqrt Fisher) W, rows weighted by their loss gradients (one gradient pass)"))
