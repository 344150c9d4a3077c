"""MoE expert pruning and merging as calibrated recipe stages (sequential engine, one block at a time).

Per block: the router's outputs on the cached calibration inputs give each expert's usage
(tokens routed to it, mean routing weight); experts that saw no token are reported (``ctx.warn``
and the layer record). Then:

* ``moe-prune`` keeps the ``keep`` most-used experts: their slices of the fused expert tensors and
  their router rows. The softmax is over the remaining rows, but top-k weights are renormalised
  over the chosen experts, so a token whose top-k never touched a dropped expert is routed exactly
  as before. The config's expert count is updated: the model reloads with plain ``transformers``.
* ``moe-merge`` clusters experts by the cosine similarity of their outputs on calibration tokens
  and replaces each cluster by the usage-weighted average of its members' weights. Router logits:
  ``router: remap`` (default) keeps every original row and maps the chosen index to the merged
  expert, so routing decisions and weights are those of the original model (needs modelpress to
  load); ``router: fold`` replaces a cluster's rows by their usage-weighted average row, a plain
  router that reloads with ``transformers`` but routes approximately (agreement is reported).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from ...core.errors import ModelpressError
from ...core.selectors import select
from ...models.archspec import MoESpec, blocks_path, get_blocks
from ...models.layers import set_submodule
from ...models.loading import LoadedModel
from ...core.method import METHODS, LayerRecord, MethodConfig, MethodEntry, RunContext
from ...calib.blocks import BlockInputs
from .experts import ExpertUsage, cluster_experts, cosine_similarity_matrix, least_used, merge_stacked, merge_weights
from .router import RemappedRouter


class MoEPruneConfig(MethodConfig):
    """Keep the ``keep`` most-used experts of every selected MoE layer (``targets`` match router names).

    Example:
        >>> MoEPruneConfig(keep=6).keep
        6
    """

    method: Literal["moe-prune"] = "moe-prune"
    keep: int = Field(gt=0, description="experts kept per layer (the same in every layer: one config value)")


class MoEMergeConfig(MethodConfig):
    """Merge every selected MoE layer's experts into ``keep`` usage-weighted averages of similar experts.

    Example:
        >>> MoEMergeConfig(keep=4, router="fold").router
        'fold'
    """

    method: Literal["moe-merge"] = "moe-merge"
    keep: int = Field(gt=0, description="experts left per layer")
    router: Literal["remap", "fold"] = "remap"
    similarity_tokens: int = Field(1024, gt=0, description="calibration tokens whose expert outputs are compared")


# ---- helpers -------------------------------------------------------------------------------------
def _moe_spec(lm: LoadedModel) -> MoESpec:
    if lm.spec is None or lm.spec.moe is None:
        raise ModelpressError(f"MoE methods need a mixture-of-experts architecture; "
                              f"{lm.spec.name if lm.spec else type(lm.module).__name__} has no experts in its ArchSpec")
    return lm.spec.moe


def _selected_blocks(lm: LoadedModel, cfg: MethodConfig) -> set[int]:
    moe, prefix = _moe_spec(lm), blocks_path(lm.module, lm.spec)
    routers = [(f"{prefix}.{i}.{moe.router}", b.get_submodule(moe.router)) for i, b in enumerate(get_blocks(lm.module, lm.spec))]
    chosen = {n for n, _ in select(routers, cfg.targets, cfg.ignore, lambda n: "router")}
    if len(chosen) != len(routers):  # one config value holds the expert count of every layer
        raise ModelpressError(f"{cfg.method} changes the config's {moe.num_experts_key}: it must select every MoE "
                              f"layer ({len(chosen)} of {len(routers)} selected)")
    return set(range(len(routers)))


def _num_experts(block: nn.Module, moe: MoESpec) -> int:
    return int(getattr(block.get_submodule(moe.experts), moe.expert_params[0]).shape[0])


def _observe(block: nn.Module, moe: MoESpec, inputs: BlockInputs, keep_tokens: int = 0) -> tuple[ExpertUsage, torch.Tensor]:
    """Usage over all cached inputs, and the first ``keep_tokens`` router inputs (n, d)."""
    usage, seen = ExpertUsage(_num_experts(block, moe)), []

    def hook(_m: nn.Module, args: tuple, out: tuple) -> None:
        usage.update(*out[:3])  # (logits, top-k weights, top-k indices)
        if sum(x.shape[0] for x in seen) < keep_tokens:
            seen.append(args[0].detach().reshape(-1, args[0].shape[-1]))

    router = block.get_submodule(moe.router)
    h = router.register_forward_hook(hook)
    try:
        inputs.run(block, stop_after=router)
    finally:
        h.remove()
    X = torch.cat(seen)[:keep_tokens] if seen else torch.empty(0)
    return usage, X


def _report_usage(ctx: RunContext, name: str, method: str, usage: ExpertUsage, extra: list[str]) -> None:
    unused = usage.unused()
    if unused:
        ctx.warn(f"{name}: experts {unused} received no calibration tokens (of {usage.n_tokens}); "
                 f"{'dropped first' if method == 'moe-prune' else 'merged with zero usage weight'}")
    notes = [f"usage={usage.to_dict()}"] + ([f"unused experts={unused}"] if unused else []) + extra
    ctx.layers.append(LayerRecord(name, method, notes=notes))


def _set_count(lm: LoadedModel, block: nn.Module, moe: MoESpec, n: int) -> None:
    for path in (moe.router, moe.experts):
        m = block.get_submodule(path)
        for attr in moe.count_attrs:
            if hasattr(m, attr):
                setattr(m, attr, n)
    cfg = getattr(lm.module, "config", None)
    if cfg is not None:
        setattr(cfg, moe.num_experts_key, n)


def _check_keep(lm: LoadedModel, moe: MoESpec, keep: int, n_experts: int) -> None:
    top_k = getattr(getattr(lm.module, "config", None), moe.top_k_key, 1)
    if not top_k <= keep <= n_experts:
        raise ModelpressError(f"keep={keep} experts: must be between top-k ({top_k}) and the layer's {n_experts} experts")


def expert_outputs(experts: nn.Module, X: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(E, n, d): each expert alone on every token of ``X`` (n, d), through the experts module's own forward."""
    idx, w = torch.zeros(X.shape[0], 1, dtype=torch.long), torch.ones(X.shape[0], 1, dtype=X.dtype)
    return torch.stack([experts(X, idx + e, w) for e in range(n_experts)])


# ---- stages --------------------------------------------------------------------------------------
class _MoEStage(ABC):
    """Shared prologue of the expert stages: only the chosen blocks, a valid ``keep``, then ``_apply``."""

    def __init__(self, cfg: MoEPruneConfig | MoEMergeConfig, blocks: set[int]) -> None:
        self.cfg, self.blocks = cfg, blocks

    def process_block(self, lm: LoadedModel, index: int, block: nn.Module, prefix: str,
                      inputs: BlockInputs, ctx: RunContext) -> None:
        if index not in self.blocks:
            return
        moe = _moe_spec(lm)
        n_exp = _num_experts(block, moe)
        _check_keep(lm, moe, self.cfg.keep, n_exp)
        self._apply(lm, block, prefix, moe, n_exp, inputs, ctx)

    def restore_block(self, lm: LoadedModel, index: int, block: nn.Module) -> None:
        """A block rebuilt from its checkpoint holds the reduced experts: set the counts its router,
        experts module and the config cache (the engine's resume calls this)."""
        if index in self.blocks:
            moe = _moe_spec(lm)
            _set_count(lm, block, moe, _num_experts(block, moe))

    @abstractmethod
    def _apply(self, lm: LoadedModel, block: nn.Module, prefix: str, moe: MoESpec, n_exp: int,
               inputs: BlockInputs, ctx: RunContext) -> None:
        """Prune or merge this block's experts."""


class MoEPruneStage(_MoEStage):
    def _apply(self, lm: LoadedModel, block: nn.Module, prefix: str, moe: MoESpec, n_exp: int,
               inputs: BlockInputs, ctx: RunContext) -> None:
        usage, _ = _observe(block, moe, inputs)
        dropped = least_used(usage, n_exp - self.cfg.keep)
        kept = [e for e in range(n_exp) if e not in dropped]
        experts, router = block.get_submodule(moe.experts), block.get_submodule(moe.router)
        for p in moe.expert_params:
            setattr(experts, p, nn.Parameter(getattr(experts, p).data[kept].clone(), requires_grad=False))
        router.weight = nn.Parameter(router.weight.data[kept].clone(), requires_grad=False)
        _set_count(lm, block, moe, len(kept))
        lost = int(usage.tokens[dropped].sum())
        _report_usage(ctx, f"{prefix}.{moe.router}", "moe-prune", usage,
                      [f"dropped experts={dropped}", f"routed token slots lost={lost}/{int(usage.tokens.sum())}"])


class MoEMergeStage(_MoEStage):
    def _apply(self, lm: LoadedModel, block: nn.Module, prefix: str, moe: MoESpec, n_exp: int,
               inputs: BlockInputs, ctx: RunContext) -> None:
        usage, X = _observe(block, moe, inputs, self.cfg.similarity_tokens)
        experts, router = block.get_submodule(moe.experts), block.get_submodule(moe.router)
        groups = cluster_experts(cosine_similarity_matrix(expert_outputs(experts, X, n_exp)), self.cfg.keep)
        coeffs, notes = [], [f"groups={groups}"]
        for g in groups:
            c, uniform = merge_weights(usage.tokens, g)
            coeffs.append(c)
            if uniform and len(g) > 1:
                ctx.warn(f"{prefix}: experts {g} saw no calibration tokens; merged with uniform weights")
        for p in moe.expert_params:
            merged = merge_stacked(getattr(experts, p).data, groups, coeffs)
            setattr(experts, p, nn.Parameter(merged, requires_grad=False))
        expert_map = torch.empty(n_exp, dtype=torch.long)
        for j, g in enumerate(groups):
            expert_map[g] = j
        before = expert_map[router(X)[2]]  # original decisions, mapped to merged experts
        if self.cfg.router == "remap":
            top_k = getattr(lm.module.config, moe.top_k_key)
            set_submodule(block, moe.router, RemappedRouter(router.weight.data, expert_map, top_k))
        else:
            router.weight = nn.Parameter(merge_stacked(router.weight.data, groups, coeffs), requires_grad=False)
        _set_count(lm, block, moe, len(groups))
        after = block.get_submodule(moe.router)(X)[2]
        notes.append(f"routing agreement={_agreement(before, after):.4f} (tokens whose set of merged experts is unchanged)")
        _report_usage(ctx, f"{prefix}.{moe.router}", "moe-merge", usage, notes)


def _agreement(before: torch.Tensor, after: torch.Tensor) -> float:
    """Fraction of rows of (n, k) index tensors whose sets of values are equal."""
    if before.numel() == 0:
        return 1.0
    E = int(max(before.max(), after.max())) + 1
    hot = lambda t: torch.zeros(t.shape[0], E, dtype=torch.bool).scatter_(1, t, True)  # noqa: E731
    return float((hot(before) == hot(after)).all(1).float().mean())


@torch.no_grad()
def expert_usage(lm: LoadedModel, calib: torch.Tensor) -> list[ExpertUsage]:
    """Usage statistics of every MoE layer over the calibration ids (one plain forward per sample)."""
    moe = _moe_spec(lm)
    blocks = get_blocks(lm.module, lm.spec)
    stats = [ExpertUsage(_num_experts(b, moe)) for b in blocks]
    handles = [b.get_submodule(moe.router).register_forward_hook(lambda _m, _a, out, s=s: s.update(*out[:3]))
               for b, s in zip(blocks, stats)]
    try:
        for row in calib:
            lm.module(input_ids=row[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return stats


def moe_prune_stage(lm: LoadedModel, cfg: MoEPruneConfig) -> MoEPruneStage:
    return MoEPruneStage(cfg, _selected_blocks(lm, cfg))


def moe_merge_stage(lm: LoadedModel, cfg: MoEMergeConfig) -> MoEMergeStage:
    return MoEMergeStage(cfg, _selected_blocks(lm, cfg))


METHODS.register("moe-prune")(MethodEntry(MoEPruneConfig, None, needs_calibration=True, block_stage=moe_prune_stage,
                                          summary="MoE: drop the least-used experts per layer (router rows too)"))
METHODS.register("moe-merge")(MethodEntry(MoEMergeConfig, None, needs_calibration=True, block_stage=moe_merge_stage,
                                          summary="MoE: merge similar experts, usage-weighted; router remapped or folded"))
