"""Structured pruning as a recipe stage: scores from the sequential engine, surgery in ``shrink.py``.

For each decoder block, on its cached calibration inputs (true-sequential inside the block):

1. heads: the Gram matrix of ``o_proj``'s input is collected through a capture hook, the
   lowest-scoring heads go (optionally ``o_proj`` is refit by least squares on the kept heads);
2. MLP neurons: the same on ``down_proj``'s input, observed with the block's attention already pruned;
3. when layers are to go, the pruned block's influence (1 - cos(input, output)) is measured.

The engine then propagates the *pruned* block's outputs, so later blocks are scored on what they
will see. Whole layers are removed after the pass, the config last.

Sizes stay uniform per layer (HF configs hold one ``num_attention_heads`` / ``intermediate_size``
for all layers); which heads and neurons go is chosen per layer.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from ...calib.capture import capture_inputs
from ...calib.stats import ActStatsAccumulator, HessianAccumulator
from ...core.errors import ModelpressError
from ...models.archspec import blocks_path, get_blocks, get_submodule
from ...models.loading import LoadedModel
from ...core.method import METHODS, LayerRecord, MethodConfig, MethodEntry, RunContext
from ...calib.blocks import BlockInputs
from ..patterns import Structured
from .scores import (BlockInfluence, GQAMode, Score, count_to_remove, heads_to_remove, lowest, neuron_scores,
                     random_scores, refit_columns, unit_scores)
from .shrink import (HeadLayout, head_layout, remove_layers, role_linear, set_sizes, shape_keys, shrink_heads,
                     shrink_mlp)


class StructuredConfig(MethodConfig):
    """Remove whole heads, MLP neurons, decoder layers (or Conv2d channels) so matrices shrink.

    Example:
        >>> StructuredConfig(heads_fraction=0.25, mlp_fraction=0.25).score
        'activation'
    """

    method: Literal["structured"] = "structured"
    heads_fraction: float = Field(0.0, ge=0, lt=1, description="fraction of attention heads removed per layer")
    mlp_fraction: float = Field(0.0, ge=0, lt=1, description="fraction of MLP neurons removed per layer")
    layers: int = Field(0, ge=0, description="whole decoder layers removed (lowest block influence)")
    channels_fraction: float = Field(0.0, ge=0, lt=1, description="Conv2d output channels removed (CNNs)")
    score: Score = Field("activation", description="activation (calibrated), magnitude (weights only) or random")
    gqa: GQAMode = Field("query", description="query: the same number of query heads from each K/V group; "
                                              "kv: whole K/V groups")
    seed: int = Field(0, description="seed of the random score")
    reconstruct: bool = Field(False, description="refit the kept columns of o_proj / down_proj by least squares on "
                                                 "the calibration inputs (one-shot compensation, no training)")
    dampening_frac: float = Field(0.01, gt=0, lt=1, description="ridge term of the refit: fraction of mean diag(H)")

    def needs_data(self) -> bool:
        """Calibration is needed for activation scores, the refit, and ranking layers by influence."""
        units = bool(self.heads_fraction or self.mlp_fraction)
        return (units and (self.score == "activation" or self.reconstruct)) or (self.layers > 0 and self.score != "random")


class StructuredStage:
    """Per-block scoring and surgery on the sequential engine (or without data for weight/random scores)."""

    name = "structured"

    def __init__(self, cfg: StructuredConfig, layout: HeadLayout | None, inter: int | None) -> None:
        self.cfg, self.layout, self.inter = cfg, layout, inter
        self.new_layout: HeadLayout | None = None
        self.new_inter: int | None = None
        self.influence: dict[int, float] = {}

    @property
    def needs_inputs(self) -> bool:
        """Scores from weights (or random ones) and no refit: the blocks are visited without data."""
        return self.cfg.needs_data()

    def finish(self, lm: LoadedModel, ctx: RunContext) -> None:
        """After every block: write the new sizes into the config, then drop whole layers."""
        set_sizes(lm.module, lm.spec, heads=self.new_layout, intermediate=self.new_inter)
        if self.cfg.layers:
            prefix = blocks_path(lm.module, lm.spec)
            _drop_layers(lm, self.cfg, self, len(get_blocks(lm.module, lm.spec)), prefix, ctx)

    def process_block(self, lm: LoadedModel, index: int, block: nn.Module, prefix: str,
                      inputs: BlockInputs | None, ctx: RunContext) -> None:
        """Heads first, then the MLP observed on the pruned attention's outputs (true-sequential)."""
        cfg, spec = self.cfg, lm.spec
        if cfg.heads_fraction:
            self._prune_heads(index, block, f"{prefix}.{spec.roles['o_proj']}", spec, inputs, ctx)
        if cfg.mlp_fraction:
            self._prune_mlp(index, block, f"{prefix}.{spec.roles['down_proj']}", spec, inputs, ctx)
        if cfg.layers and cfg.score != "random":
            self.influence[index] = block_influence(block, inputs)

    def _prune_heads(self, index: int, block: nn.Module, name: str, spec, inputs: BlockInputs | None,
                     ctx: RunContext) -> None:
        cfg, L = self.cfg, self.layout
        o = block.get_submodule(spec.roles["o_proj"])
        H = self._stats(block, o, inputs, ctx, full=True)  # (heads*d, heads*d) or None
        W = o.weight.detach().float().clone()  # (hidden, heads*d) before pruning
        if cfg.score == "random":
            hs, gs = random_scores(L.heads, cfg.seed + 2 * index), random_scores(L.kv_heads, cfg.seed + 2 * index)
        else:
            G = H if cfg.score == "activation" else None
            hs, gs = unit_scores(W, G, L.head_dim), unit_scores(W, G, L.head_dim * L.group)
        drop = heads_to_remove(hs, gs, cfg.heads_fraction, cfg.gqa)
        self.new_layout = shrink_heads(block, spec, L, drop, name.rpartition(".")[0])
        if cfg.reconstruct:
            keep = torch.tensor([c for c in range(W.shape[1]) if c // L.head_dim not in set(drop)])
            o.weight.data = refit_columns(W, H, keep, cfg.dampening_frac).to(o.weight.dtype)
        self._record(ctx, name, "heads", "attention heads", o, drop)

    def _prune_mlp(self, index: int, block: nn.Module, name: str, spec, inputs: BlockInputs | None,
                   ctx: RunContext) -> None:
        cfg = self.cfg
        down = block.get_submodule(spec.roles["down_proj"])
        H = self._stats(block, down, inputs, ctx, full=cfg.reconstruct)  # (inter, inter), (inter,) or None
        W = down.weight.detach().float().clone()  # (hidden, inter) before pruning
        if cfg.score == "random":
            sc = random_scores(self.inter, cfg.seed + 2 * index + 1)
        else:
            sq = H.diagonal() if H is not None and H.dim() == 2 else H
            sc = neuron_scores(W, sq if cfg.score == "activation" else None)
        drop = lowest(sc, count_to_remove(cfg.mlp_fraction, self.inter, f"{name}: MLP neurons"))
        self.new_inter = shrink_mlp(block, spec, self.inter, drop, name.rpartition(".")[0])
        if cfg.reconstruct:
            keep = torch.tensor([j for j in range(self.inter) if j not in set(drop)])
            down.weight.data = refit_columns(W, H, keep, cfg.dampening_frac).to(down.weight.dtype)
        self._record(ctx, name, "channels", "MLP neurons", down, drop)

    def _stats(self, block: nn.Module, layer: nn.Linear, inputs: BlockInputs | None, ctx: RunContext,
               full: bool) -> torch.Tensor | None:
        """Gram matrix (``full``) or its diagonal (sum of squares) of ``layer``'s input on the cached tokens.

        None when the score and the options need no data.
        """
        if not (self.cfg.score == "activation" or self.cfg.reconstruct):
            return None
        acc = HessianAccumulator(layer.in_features) if full else ActStatsAccumulator(layer.in_features)
        with capture_inputs({"x": layer}, lambda _n, x: acc.update(x.float())):
            inputs.run(block, stop_after=layer)
        if full and self.cfg.reconstruct and acc.nsamples < 2 * layer.in_features:
            ctx.warn(f"structured: the refit of {layer.in_features}-wide layers saw only {acc.nsamples} calibration "
                     "tokens (rank-deficient fit, can hurt badly); use several times more tokens than the width")
        return acc.H if full else acc.sq_sum

    @staticmethod
    def _record(ctx: RunContext, name: str, kind: str, unit: str, layer: nn.Linear, drop: list[int]) -> None:
        ctx.layers.append(LayerRecord(name, "structured", {"pattern": Structured(kind=kind).to_dict(), "unit": unit,
                                                           "removed": drop}, tuple(layer.weight.shape),
                                      notes=[f"removed {len(drop)} {unit}"]))


def block_influence(block: nn.Module, inputs: BlockInputs) -> float:
    """``1 - mean cos(input, output)`` of ``block`` over the cached calibration tokens."""
    bi = BlockInfluence()

    def hook(_m: nn.Module, args: tuple, kwargs: dict, out: object) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        bi.update(x, out[0] if isinstance(out, tuple) else out)

    handle = block.register_forward_hook(hook, with_kwargs=True)
    try:
        inputs.run(block)
    finally:
        handle.remove()
    return bi.value


def run_structured(lm: LoadedModel, cfg: StructuredConfig, ctx: RunContext) -> None:
    """Prune ``lm`` in place as ``cfg`` says (see the module docstring)."""
    if cfg.targets != ["re:.*"] or cfg.ignore != ["lm_head"]:
        raise ModelpressError("structured: targets/ignore are not supported: every decoder block is pruned alike "
                              "(HF configs hold one size for all layers)")
    blocks = get_blocks(lm.module, lm.spec) if lm.spec else []
    if not blocks:
        return _run_conv(lm, cfg, ctx)
    if cfg.channels_fraction:
        raise ModelpressError("structured: channels_fraction applies to Conv2d networks; for decoder models "
                              "use heads_fraction / mlp_fraction / layers")
    prefix = blocks_path(lm.module, lm.spec)
    stage = _plan(lm, cfg, blocks, prefix, ctx)
    if cfg.needs_data():
        if ctx.calib is None:
            why = "the refit" if cfg.reconstruct and cfg.score != "activation" else f"score {cfg.score!r}"
            raise ModelpressError(f"structured with {why} needs calibration data (--calib FILE)")
        if ctx.workdir:
            ctx.warn("structured pruning changes block shapes, so it keeps no per-block checkpoints")
    ctx.run_blocks([stage], checkpoints=False)  # the runner's pass; then stage.finish resizes the config




def _plan(lm: LoadedModel, cfg: StructuredConfig, blocks: list[nn.Module], prefix: str,
          ctx: RunContext) -> StructuredStage:
    """Check every request against the model before any work; note rounded fractions."""
    shape_keys(lm.spec, "heads, neurons or layers")
    roles = (("q_proj", "k_proj", "v_proj", "o_proj") if cfg.heads_fraction else ()) + (
        tuple(r for r in ("gate_proj", "up_proj", "down_proj") if r in lm.spec.roles) if cfg.mlp_fraction else ())
    for i, b in enumerate(blocks):
        for r in roles:
            role_linear(b, lm.spec, r, f"{prefix}.{i}")
    layout = head_layout(lm.module, lm.spec) if cfg.heads_fraction else None
    inter = None
    if cfg.mlp_fraction:
        keys = shape_keys(lm.spec, "MLP neurons")
        down = get_submodule(blocks[0], lm.spec.roles.get("down_proj", ""))
        inter = int(getattr(lm.module.config, keys.intermediate or "", 0) or down.in_features)
        count_to_remove(cfg.mlp_fraction, inter, "MLP neurons")
    if layout is not None:
        drop = heads_to_remove(torch.zeros(layout.heads), torch.zeros(layout.kv_heads), cfg.heads_fraction, cfg.gqa)
        if abs(len(drop) / layout.heads - cfg.heads_fraction) > 1e-9:
            ctx.warn(f"structured: heads_fraction {cfg.heads_fraction} of {layout.heads} heads in {layout.kv_heads} "
                     f"K/V groups removes {len(drop)} per layer ({len(drop) / layout.heads:.1%}), the nearest "
                     f"grouped-query attention allows with gqa={cfg.gqa!r}")
    if cfg.layers >= len(blocks):
        raise ModelpressError(f"structured: cannot remove {cfg.layers} of the model's {len(blocks)} decoder layers")
    return StructuredStage(cfg, layout, inter)


def _drop_layers(lm: LoadedModel, cfg: StructuredConfig, stage: StructuredStage, n: int, prefix: str,
                 ctx: RunContext) -> None:
    scores = (random_scores(n, cfg.seed + 10_007) if cfg.score == "random"
              else torch.tensor([stage.influence[i] for i in range(n)]))
    drop = lowest(scores, cfg.layers)
    remove_layers(lm, drop)
    bi = {i: round(stage.influence[i], 5) for i in drop} if stage.influence else {}
    ctx.layers.append(LayerRecord(prefix, "structured", {"pattern": Structured(kind="layers").to_dict(),
                                                         "unit": "decoder layers", "removed": drop},
                                  notes=[f"removed layers {drop}" + (f" (block influence {bi})" if bi else "")]))


def _run_conv(lm: LoadedModel, cfg: StructuredConfig, ctx: RunContext) -> None:
    if cfg.heads_fraction or cfg.mlp_fraction or cfg.layers:
        raise ModelpressError(f"structured: heads/MLP/layer pruning needs a known decoder architecture; "
                              f"{type(lm.module).__name__} has none (channels_fraction prunes Conv2d networks)")
    from .conv import prune_conv_channels

    res = prune_conv_channels(lm.module, cfg.channels_fraction, score=cfg.score, example_inputs=ctx.calib,
                              seed=cfg.seed)
    for conv, removed in res.removed.items():
        ctx.layers.append(LayerRecord(conv, "structured", {"pattern": Structured(kind="channels").to_dict(),
                                                           "unit": "Conv2d channels", "removed": removed},
                                      tuple(lm.module.get_submodule(conv).weight.shape[:2]),
                                      notes=[f"removed {len(removed)} Conv2d channels"]))
    for w in res.skipped:
        ctx.warn(w)


METHODS.register("structured")(MethodEntry(StructuredConfig, run_structured, needs_calibration=False,
                                           summary="structured pruning: heads, MLP neurons, layers, Conv2d channels"))
