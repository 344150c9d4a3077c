"""Low-rank factorisation as recipe stages: ``svd`` (data-free), ``asvd`` and ``svdllm`` (block-wise
on the calibration engine). The maths is in ``factor.py``, the rank rules in ``ranks.py``.

The calibrated stages run on the shared observe-then-apply block stage: hooks feed each input set
(q/k/v read one tensor) an accumulator (activation statistics for ASVD, the Gram matrix for
SVD-LLM), then every layer of the set is factorised and replaced by a :class:`LowRankLinear`. With
``true_sequential`` later layers see the earlier ones already factorised, as GPTQ does.
A ``global`` budget is allocated before the pass from the weights' own singular values (the
whitened spectra are only known block by block); the factorisation itself stays activation-aware.
"""
from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn as nn
from pydantic import Field

from ..calib.observed import ObservedBlockStage
from ..calib.stats import ActStatsAccumulator, HessianAccumulator
from ..core.layers import set_submodule
from ..core.method import METHODS, LayerRecord, MethodEntry, RunContext
from ..models.loading import LoadedModel
from ..models.selection import layer_weight, select_layers
from .factor import Factors, asvd_scale, scaled_factor, svd_factor, whitened_factor
from .layer import LowRankLinear
from .ranks import RankConfig, global_ranks, rank_rule


class SVDConfig(RankConfig):
    """Plain truncated SVD of each weight (no data).

    Example:
        >>> SVDConfig(param_ratio=0.8).allocation
        'uniform'
    """

    method: Literal["svd"] = "svd"


class ASVDConfig(RankConfig):
    """ASVD (Yuan et al., 2023): columns scaled by mean |x|^alpha before the SVD, unscaled after.

    Example:
        >>> ASVDConfig(alpha=0.5, rank=16).rank
        16
    """

    method: Literal["asvd"] = "asvd"
    alpha: float = Field(0.5, gt=0, le=2, description="exponent of the activation scale (paper: 0.5)")
    true_sequential: bool = Field(True, description="later layers of a block see earlier ones factorised")


class SVDLLMConfig(RankConfig):
    """SVD-LLM (Wang et al., 2024): truncation-aware whitening by the Cholesky factor of X^T X.

    Example:
        >>> SVDLLMConfig(energy=0.95).dampening
        0.0
    """

    method: Literal["svdllm"] = "svdllm"
    dampening: float = Field(0.0, ge=0, lt=1, description="fraction of mean diag(X^T X) added before Cholesky; "
                                                          "raised automatically while it is not positive definite")
    true_sequential: bool = Field(True, description="later layers of a block see earlier ones factorised")


# ---- shared plumbing -----------------------------------------------------------------------------
def plan_ranks(layers: list[tuple[str, nn.Module]], cfg: RankConfig) -> dict[str, int] | None:
    """Global allocation (from each weight's singular values), or None for per-layer rules."""
    if cfg.allocation != "global":
        return None
    spectra = {}
    for name, m in layers:
        w = layer_weight(name, m)  # (out, in)
        spectra[name] = (tuple(w.shape), torch.linalg.svdvals(w.double()))
    return global_ranks(spectra, cfg.param_ratio)


def install_factors(lm: LoadedModel, name: str, module: nn.Module, W: torch.Tensor, f: Factors, method: str,
                    ctx: RunContext, out_rel_error: float | None = None) -> LowRankLinear:
    """Replace ``module`` by ``B @ A`` (+ its bias) and append the layer's report row."""
    bias = getattr(module, "bias", None)
    new = LowRankLinear.from_factors(f.B, f.A, bias.detach().float() if bias is not None else None)
    set_submodule(lm.module, name, new)
    saved = new.dequantized_weight()  # the weight the layer now computes with
    frac = new.params_kept() / W.numel()
    rec = LayerRecord(name, method, None, tuple(W.shape), 32.0 * frac,
                      float((W - saved).norm() / W.norm().clamp_min(1e-12)), out_rel_error,
                      [f"rank {f.rank} of {min(W.shape)}, keeps {frac:.4f} of the weights"] + f.notes)
    for n in f.notes:
        ctx.warn(f"{name}: {n}")
    ctx.layers.append(rec)
    return new


def _ranked(cfg: RankConfig, name: str, W: torch.Tensor, planned: dict[str, int] | None):
    return rank_rule(cfg, name, tuple(W.shape), planned)


# ---- svd (data-free) -----------------------------------------------------------------------------
def run_svd(lm: LoadedModel, cfg: SVDConfig, ctx: RunContext) -> None:
    """Factorise every selected layer by its truncated SVD."""
    layers = select_layers(lm, cfg)
    planned = plan_ranks(layers, cfg)
    for name, module in ctx.iterate(layers, "SVD"):
        W = layer_weight(name, module)  # (out, in)
        install_factors(lm, name, module, W, svd_factor(W, _ranked(cfg, name, W, planned)), "svd", ctx)


# ---- asvd / svdllm (block-wise) ------------------------------------------------------------------
FactorFn = Callable[[torch.Tensor, object, object], Factors]  # (W, accumulator, rank) -> factors


class LowRankStage(ObservedBlockStage):
    """Block stage: per input set, statistics from the calibration pass, then each layer factorised."""

    def __init__(self, cfg: RankConfig, selected: list[str], planned: dict[str, int] | None,
                 make_acc: Callable[[int], object], factor: FactorFn, with_gram: bool) -> None:
        super().__init__(selected, make_acc, self._factor_set, cfg.true_sequential)
        self.cfg, self.planned, self.factor, self.with_gram = cfg, planned, factor, with_gram

    def _factor_set(self, lm: LoadedModel, mods: dict[str, nn.Module], acc, ctx: RunContext) -> None:
        seen = acc.nsamples if self.with_gram else acc.ntokens
        for name, module in mods.items():
            W = layer_weight(name, module)  # (out, in)
            rank = _ranked(self.cfg, name, W, self.planned)
            if seen == 0:
                ctx.warn(f"{name}: received no calibration tokens; factorised by plain SVD instead")
                install_factors(lm, name, module, W, svd_factor(W, rank), "svd(fallback)", ctx)
                continue
            f = self.factor(W, acc, rank)
            out_err = _output_rel_error(W, f, acc.H) if self.with_gram else None
            install_factors(lm, name, module, W, f, self.cfg.method, ctx, out_err)


def _output_rel_error(W: torch.Tensor, f: Factors, G: torch.Tensor) -> float:
    """sqrt(tr(E G E^T) / tr(W G W^T)) for E = W - B A: relative output error on the calibration inputs."""
    E = (W.double() - f.B.double() @ f.A.double())
    G = G.double()
    num = torch.einsum("oi,ij,oj->", E, G, E)
    den = torch.einsum("oi,ij,oj->", W.double(), G, W.double()).clamp_min(1e-300)
    return float((num / den).clamp_min(0).sqrt())


def asvd_stage(lm: LoadedModel, cfg: ASVDConfig) -> LowRankStage:
    layers = select_layers(lm, cfg)
    return LowRankStage(cfg, [n for n, _ in layers], plan_ranks(layers, cfg), ActStatsAccumulator,
                        lambda W, acc, r: scaled_factor(W, asvd_scale(acc.mean_abs, cfg.alpha), r), with_gram=False)


def svdllm_stage(lm: LoadedModel, cfg: SVDLLMConfig) -> LowRankStage:
    layers = select_layers(lm, cfg)
    # float32 running mean as GPTQ keeps it; whitening() factorises it in float64
    return LowRankStage(cfg, [n for n, _ in layers], plan_ranks(layers, cfg), HessianAccumulator,
                        lambda W, acc, r: whitened_factor(W, acc.H, r, cfg.dampening), with_gram=True)


METHODS.register("svd")(MethodEntry(SVDConfig, run_svd, summary="truncated SVD: each linear as B @ A (data-free)"))
METHODS.register("asvd")(MethodEntry(ASVDConfig, None, needs_calibration=True, block_stage=asvd_stage,
                                     summary="ASVD: SVD of W diag(mean|x|^alpha), activation-aware low rank"))
METHODS.register("svdllm")(MethodEntry(SVDLLMConfig, None, needs_calibration=True, block_stage=svdllm_stage,
                                       summary="SVD-LLM: SVD of the Cholesky-whitened weight (truncation-aware)"))
