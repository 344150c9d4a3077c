"""Tensor surgery: remove attention heads, MLP neurons and decoder layers in place.

Every function receives the units to *remove*, checks them, slices the weights of the roles the
:class:`~modelpress.models.archspec.ArchSpec` names and rewrites the sizes the model records (HF
config keys, attributes cached by attention modules), so the model runs at its new size and
``from_pretrained`` rebuilds exactly these shapes. No function tests a model's class.

HF configs hold one size for all layers, so the model-level functions require the same number
of heads (and neurons) removed in every block; *which* ones may differ per block.

Example:
    >>> prune_heads(lm, [1, 2])          # heads 1 and 2 of every block     # doctest: +SKIP
    >>> prune_neurons(lm, {0: [5], 1: [7]})                                  # doctest: +SKIP
    >>> remove_layers(lm, [3])                                               # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn as nn

from ...core.errors import ModelpressError
from ...models.archspec import ArchSpec, ShapeKeys, blocks_path, get_blocks, get_submodule
from ...models.loading import LoadedModel


@dataclass(frozen=True)
class HeadLayout:
    """Attention sizes of one block: ``heads`` query heads sharing ``kv_heads`` K/V heads (GQA)."""

    heads: int
    kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        """Query heads per K/V head."""
        return self.heads // self.kv_heads


def shape_keys(spec: ArchSpec | None, what: str) -> ShapeKeys:
    """The spec's size keys, or a one-line error naming what cannot be pruned."""
    if spec is None or spec.shapes is None:
        name = spec.name if spec is not None else "unknown"
        raise ModelpressError(f"structured pruning of {what} needs the architecture's size keys; "
                              f"architecture {name!r} has none in its ArchSpec")
    if spec.transposed:
        raise ModelpressError(f"structured pruning does not support transposed (Conv1D) layers ({spec.name})")
    return spec.shapes


def _config(model: nn.Module) -> object:
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ModelpressError(f"{type(model).__name__} has no config to record its new sizes in")
    return cfg


def head_layout(model: nn.Module, spec: ArchSpec) -> HeadLayout:
    """The current head layout, read from the config keys the spec names."""
    keys, cfg = shape_keys(spec, "attention heads"), _config(model)
    if keys.heads is None:
        raise ModelpressError(f"architecture {spec.name!r} cannot represent pruned attention heads in its config")
    heads = int(getattr(cfg, keys.heads))
    kv = int(getattr(cfg, keys.kv_heads, None) or heads) if keys.kv_heads else heads
    dim = getattr(cfg, keys.head_dim, None) if keys.head_dim else None
    return HeadLayout(heads, kv, int(dim or cfg.hidden_size // heads))


def role_linear(block: nn.Module, spec: ArchSpec, role: str, where: str) -> nn.Linear:
    """The float ``nn.Linear`` playing ``role`` in ``block``; a one-line error otherwise."""
    path = spec.roles.get(role)
    mod = get_submodule(block, path) if path else None
    if mod is None:
        raise ModelpressError(f"{where}: no {role} layer (ArchSpec {spec.name!r}) to prune")
    if type(mod) is not nn.Linear:
        raise ModelpressError(f"{where}.{path}: structured pruning needs a float nn.Linear, got "
                              f"{type(mod).__name__}; run structured pruning before quantisation or sparsity stages")
    return mod


def take_rows(lin: nn.Linear, keep: torch.Tensor) -> None:
    """Keep output rows ``keep`` of ``lin`` (weight and bias)."""
    lin.weight = nn.Parameter(lin.weight.data.index_select(0, keep).clone(), lin.weight.requires_grad)
    if lin.bias is not None:
        lin.bias = nn.Parameter(lin.bias.data.index_select(0, keep).clone(), lin.bias.requires_grad)
    lin.out_features = int(keep.numel())


def take_cols(lin: nn.Linear, keep: torch.Tensor) -> None:
    """Keep input columns ``keep`` of ``lin`` (the bias is unchanged)."""
    lin.weight = nn.Parameter(lin.weight.data.index_select(1, keep).clone(), lin.weight.requires_grad)
    lin.in_features = int(keep.numel())


def _complement(n: int, remove: Sequence[int], what: str, where: str) -> torch.Tensor:
    """Sorted indices of [0, n) not in ``remove``, after checking ``remove``."""
    bad = [i for i in remove if not 0 <= int(i) < n]
    if bad:
        raise ModelpressError(f"{where}: {what} {bad} out of range (there are {n}, numbered 0..{n - 1})")
    if len(set(map(int, remove))) != len(remove):
        raise ModelpressError(f"{where}: {what} to remove {sorted(remove)} contain duplicates")
    if len(remove) >= n:
        raise ModelpressError(f"{where}: cannot remove all {n} {what}")
    gone = set(map(int, remove))
    return torch.tensor([i for i in range(n) if i not in gone], dtype=torch.long)


def _unit_rows(units: torch.Tensor, width: int) -> torch.Tensor:
    """Row indices of whole units of ``width`` rows: unit u -> rows [u*width, (u+1)*width)."""
    return (units[:, None] * width + torch.arange(width)).reshape(-1)


def plan_heads(layout: HeadLayout, remove: Sequence[int], where: str = "block") -> tuple[torch.Tensor, torch.Tensor]:
    """(query heads kept, K/V heads kept) when removing query heads ``remove``; checks GQA stays valid.

    A K/V head whose whole query group is removed goes too. The groups left must keep the same
    number of query heads each, as grouped-query attention needs: remove whole groups, or the
    same number of heads from every group.
    """
    keep_q = _complement(layout.heads, remove, "attention heads", where)
    per_group = torch.bincount(keep_q // layout.group, minlength=layout.kv_heads)  # (kv_heads,)
    keep_kv = per_group.nonzero().flatten()
    counts = per_group[keep_kv]
    if not bool((counts == counts[0]).all()):
        raise ModelpressError(f"{where}: after removing heads {sorted(remove)} the K/V groups keep "
                              f"{per_group.tolist()} query heads; grouped-query attention needs the same number in each")
    return keep_q, keep_kv


def shrink_heads(block: nn.Module, spec: ArchSpec, layout: HeadLayout, remove: Sequence[int],
                 where: str = "block") -> HeadLayout:
    """Remove query heads ``remove`` (and K/V heads left without queries) from one block.

    Returns the block's new layout; nothing is changed when the request is refused.
    """
    keep_q, keep_kv = plan_heads(layout, remove, where)
    q, k, v, o = (role_linear(block, spec, r, where) for r in ("q_proj", "k_proj", "v_proj", "o_proj"))
    d = layout.head_dim
    _take_norm_rows(block, spec, "q_proj", q.out_features, _unit_rows(keep_q, d))
    _take_norm_rows(block, spec, "k_proj", k.out_features, _unit_rows(keep_kv, d))
    take_rows(q, _unit_rows(keep_q, d))
    take_rows(k, _unit_rows(keep_kv, d))
    take_rows(v, _unit_rows(keep_kv, d))
    take_cols(o, _unit_rows(keep_q, d))
    new = HeadLayout(int(keep_q.numel()), int(keep_kv.numel()), d)
    attr = spec.shapes.attn_groups_attr if spec.shapes else None
    attn = get_submodule(block, spec.roles["q_proj"].rpartition(".")[0])
    if attr and attn is not None and hasattr(attn, attr):
        setattr(attn, attr, new.group)  # repeat_kv reads it at every forward
    return new


def _take_norm_rows(block: nn.Module, spec: ArchSpec, role: str, width: int, keep: torch.Tensor) -> None:
    """Keep entries ``keep`` of the QK-norm over ``role``'s whole output (OLMo-2 normalises all heads
    together: the kept heads are then normalised over themselves only, part of what pruning changes);
    a per-head norm (Qwen3, ``head_dim`` wide) stays as it is."""
    norm = get_submodule(block, spec.head_norms[role]) if role in spec.head_norms else None
    if norm is None:
        return
    for name, p in list(norm.named_parameters(recurse=False)):
        if p.dim() == 1 and p.numel() == width:
            setattr(norm, name, nn.Parameter(p.data.index_select(0, keep).clone(), p.requires_grad))
    if isinstance(getattr(norm, "normalized_shape", None), tuple) and norm.normalized_shape == (width,):
        norm.normalized_shape = (int(keep.numel()),)


def shrink_mlp(block: nn.Module, spec: ArchSpec, inter: int, remove: Sequence[int], where: str = "block") -> int:
    """Remove MLP neurons ``remove``: rows of gate/up, columns of down. Returns the new width."""
    keep = _complement(inter, remove, "MLP neurons", where)
    for role in ("gate_proj", "up_proj"):
        if role in spec.roles:
            take_rows(role_linear(block, spec, role, where), keep)
    take_cols(role_linear(block, spec, "down_proj", where), keep)
    return int(keep.numel())


def set_sizes(model: nn.Module, spec: ArchSpec, *, heads: HeadLayout | None = None, intermediate: int | None = None) -> None:
    """Write new sizes into the model's config (shared by every module holding it)."""
    keys, cfg = shape_keys(spec, "sizes"), _config(model)
    if heads is not None:
        setattr(cfg, keys.heads, heads.heads)
        if keys.kv_heads:
            setattr(cfg, keys.kv_heads, heads.kv_heads)
        if keys.head_dim:
            setattr(cfg, keys.head_dim, heads.head_dim)
    if intermediate is not None:
        if keys.intermediate is None:
            raise ModelpressError(f"architecture {spec.name!r} cannot represent a pruned MLP width in its config")
        setattr(cfg, keys.intermediate, intermediate)


def _per_block(units: Sequence[int] | Mapping[int, Sequence[int]], n_blocks: int, what: str) -> list[list[int]]:
    """One list per block; a plain list applies to every block. Counts must match (uniform config)."""
    if isinstance(units, Mapping):
        bad = [i for i in units if not 0 <= int(i) < n_blocks]
        if bad:
            raise ModelpressError(f"blocks {bad} out of range (the model has {n_blocks})")
        rows = [list(units.get(i, [])) for i in range(n_blocks)]
    else:
        rows = [list(units)] * n_blocks
    if len({len(r) for r in rows}) > 1:
        raise ModelpressError(f"{what}: remove the same number in every block (the HF config holds one size "
                              f"for all layers), got {[len(r) for r in rows]}")
    return rows


def _blocks(lm: LoadedModel) -> tuple[list[nn.Module], str]:
    blocks = get_blocks(lm.module, lm.spec) if lm.spec else []
    if not blocks:
        raise ModelpressError(f"{type(lm.module).__name__}: no decoder blocks found (unknown architecture)")
    return blocks, blocks_path(lm.module, lm.spec)


def prune_heads(lm: LoadedModel, heads: Sequence[int] | Mapping[int, Sequence[int]]) -> HeadLayout:
    """Remove query heads (per block, or one list for all blocks) and update the config.

    Every block's request is checked before any block changes.
    """
    blocks, prefix = _blocks(lm)
    layout = head_layout(lm.module, lm.spec)
    rows = _per_block(heads, len(blocks), "attention heads")
    kept = {tuple(len(t) for t in plan_heads(layout, r, f"{prefix}.{i}")) for i, r in enumerate(rows)}
    if len(kept) > 1:
        raise ModelpressError(f"blocks would keep different (query, K/V) head counts {sorted(kept)}")
    for i, (b, r) in enumerate(zip(blocks, rows)):
        new = shrink_heads(b, lm.spec, layout, r, f"{prefix}.{i}")
    set_sizes(lm.module, lm.spec, heads=new)
    return new


def prune_neurons(lm: LoadedModel, neurons: Sequence[int] | Mapping[int, Sequence[int]]) -> int:
    """Remove MLP neurons (per block, or one list for all blocks) and update the config.

    Every block's request is checked before any block changes.
    """
    blocks, prefix = _blocks(lm)
    keys = shape_keys(lm.spec, "MLP neurons")
    inter = int(getattr(_config(lm.module), keys.intermediate or "", 0) or
                role_linear(blocks[0], lm.spec, "down_proj", f"{prefix}.0").in_features)
    rows = _per_block(neurons, len(blocks), "MLP neurons")
    for i, r in enumerate(rows):
        _complement(inter, r, "MLP neurons", f"{prefix}.{i}")
    width = [shrink_mlp(b, lm.spec, inter, r, f"{prefix}.{i}") for i, (b, r) in enumerate(zip(blocks, rows))][0]
    set_sizes(lm.module, lm.spec, intermediate=width)
    return width


def remove_layers(lm: LoadedModel, layers: Sequence[int]) -> list[int]:
    """Delete whole decoder blocks; renumber the rest's KV-cache slots; update the config.

    Per-layer lists in the config (``layer_types`` ...) lose the removed entries too. Returns the
    indices kept.
    """
    blocks, prefix = _blocks(lm)
    keys = shape_keys(lm.spec, "decoder layers")
    keep = _complement(len(blocks), list(layers), "decoder layers", prefix).tolist()
    parent_path, _, attr = prefix.rpartition(".")
    parent = lm.module.get_submodule(parent_path) if parent_path else lm.module
    setattr(parent, attr, nn.ModuleList([blocks[i] for i in keep]))
    for new_i, i in enumerate(keep):
        for m in blocks[i].modules():
            if isinstance(getattr(m, keys.layer_index_attr, None), int):
                setattr(m, keys.layer_index_attr, new_i)
    cfg = _config(lm.module)
    for k in keys.per_layer:
        v = getattr(cfg, k, None)
        if isinstance(v, (list, tuple)) and len(v) == len(blocks):
            setattr(cfg, k, type(v)(v[i] for i in keep))
    setattr(cfg, keys.layers, len(keep))
    return keep
