"""The observe-then-apply block stage shared by every layer-wise calibrated method.

GPTQ, SparseGPT and Wanda all do the same per block: split the selected layers into groups (the
ArchSpec's true-sequential order, or all at once), run the cached calibration inputs up to the
group's last layer while hooks feed one accumulator per *input set* (q/k/v read one tensor: one
accumulator, one Hessian), then hand each set and its statistics to the method. Only the
accumulator and the per-set step differ, so the engine-side tricks live here once: stopping the
pass before the last hooked layer, replaying only the attention or MLP submodule from recorded
inputs when consecutive groups sit inside it, and, once a replayed submodule's last layer is done
(``o_proj``, ``down_proj``), keeping that submodule's outputs (:class:`~.blocks.KnownOutputs`) so
the next pass and the engine's propagation do not compute it again. With LLaMA's true-sequential
order every part of a block is then computed once per block instead of about 3.3 times.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from ..core.method import RunContext
from ..models.archspec import ArchSpec
from ..models.loading import LoadedModel
from ..models.layers import linear_shape
from .blocks import BlockInputs, KnownOutputs, Spill, SubInputs, common_ancestor, last_module
from .capture import capture_inputs

#: (loaded model, {layer name: module} of one input set, the set's accumulator, context) -> None
ApplySetFn = Callable[[LoadedModel, dict[str, nn.Module], Any, RunContext], None]

#: Replay a submodule only while its recorded inputs stay this small (they sit in RAM).
REPLAY_MAX_BYTES = 2 << 30


def layer_groups(spec: ArchSpec | None, prefix: str, names: list[str], true_sequential: bool = True) -> list[list[str]]:
    """``names`` in one group, or split in the spec's true-sequential order (layers it does not list last)."""
    if not true_sequential or spec is None or not spec.sequential:
        return [names]
    groups, placed = [], set()
    for roles in spec.sequential:
        g = [n for n in (f"{prefix}.{spec.roles[r]}" for r in roles if r in spec.roles) if n in names]
        placed.update(g)
        if g:
            groups.append(g)
    rest = [n for n in names if n not in placed]
    return groups + ([rest] if rest else [])


def shared_input_sets(spec: ArchSpec | None, prefix: str, group: list[str]) -> list[list[str]]:
    """``group`` split into sets of layers that read the same input (from the spec's scale mappings)."""
    left, sets = list(group), []
    for _prev, roles in (spec.scale_mappings if spec else ()):
        s = [n for n in (f"{prefix}.{spec.roles[r]}" for r in roles if r in spec.roles) if n in left]
        if len(s) > 1:
            sets.append(s)
            left = [n for n in left if n not in s]
    return sets + [[n] for n in left]


class ObservedBlockStage:
    """Block stage: per group, one observation pass feeding ``make_acc(in_features)`` per input set,
    then ``apply_set(lm, modules, acc, ctx)`` for each set (which may replace the modules)."""

    def __init__(self, selected: list[str], make_acc: Callable[[int], Any], apply_set: ApplySetFn,
                 true_sequential: bool = True) -> None:
        self.selected = set(selected)
        self.make_acc, self.apply_set, self.true_sequential = make_acc, apply_set, true_sequential

    def process_block(self, lm: LoadedModel, index: int, block: nn.Module, prefix: str,
                      inputs: BlockInputs, ctx: RunContext) -> None:
        names = [n for n in sorted(self.selected) if n.startswith(prefix + ".")]
        groups = layer_groups(lm.spec, prefix, names, self.true_sequential)
        replay: tuple[str, nn.Module, SubInputs] | None = None  # (name, submodule, its recorded inputs)
        for k, group in enumerate(groups):
            mods = {n: lm.module.get_submodule(n) for n in group}
            sets = shared_input_sets(lm.spec, prefix, group)
            # width from the module, not its weight: a quantised layer (compensated later) has none
            accs = {s[0]: self.make_acc(linear_shape(mods[s[0]])[1]) for s in sets}
            stop = last_module(block, [mods[n] for n in accs])
            replaying = replay is not None and _inside(replay[0], group)
            # the group's one layer may be the replayed submodule's last: keep its inputs to know the outputs
            last = group[0] if replaying and len(group) == 1 and _final(replay[0], groups[k + 1:]) else None
            # the last layer's inputs, per batch: in RAM, or spilled beside an on-disk cache (low memory)
            kept: list[torch.Tensor] | Spill = (inputs.spill("known") if last else None) or []
            rebuild = None

            def sink(n: str, x: torch.Tensor) -> None:
                accs[n].update(x.float())
                if n == last:
                    if isinstance(kept, Spill):
                        kept.put(len(kept), x)
                    else:
                        kept.append(x.detach())

            with capture_inputs({n: mods[n] for n in accs}, sink):
                if replaying:  # e.g. only the MLP, not the whole block
                    rebuild = replay[2].run(replay[1], stop_before=stop, check_last=mods[last] if last else None)
                else:
                    nxt = groups[k + 1] if k + 1 < len(groups) else []
                    target = _replay_target(lm, block, prefix, group + nxt, inputs) if nxt else None
                    sub = inputs.run(block, stop_before=stop, record=target and target[1])
                    replay = (*target, sub) if target and sub is not None else None
            for s in sets:  # the accumulator is dropped as soon as its set is done (a Hessian is large)
                self.apply_set(lm, {n: mods[n] for n in s}, accs.pop(s[0]), ctx)
            if last and rebuild is not None and len(kept) == len(replay[2].calls):
                outs = inputs.spill("known-out") if isinstance(kept, Spill) else None
                inputs.known[replay[1]] = KnownOutputs(replay[1], last[len(replay[0]) + 1:], kept, rebuild, outputs=outs)
            if replay is not None and not _inside(replay[0], group):
                replay = None  # a layer outside the recorded module changed: its inputs are stale


def _final(parent: str, later: list[list[str]]) -> bool:
    """No later group changes a layer inside ``parent`` (its outputs may then be kept)."""
    return not any(n.startswith(parent + ".") for g in later for n in g)


def _inside(parent: str, names: list[str]) -> bool:
    return all(n.startswith(parent + ".") for n in names)


def _replay_target(lm: LoadedModel, block: nn.Module, prefix: str, names: list[str],
                   inputs: BlockInputs) -> tuple[str, nn.Module] | None:
    """The submodule whose inputs to record now so the next group's pass can replay just it.

    With true-sequential order each group is observed with the earlier groups already done. When
    this group and the next (``names``) lie in one submodule (q/k/v then o in the attention,
    gate/up then down in the MLP), that submodule's inputs do not depend on them, so the next
    pass can start from its recorded inputs instead of from the block's.
    """
    if inputs.pages is None and inputs.hidden.numel() * inputs.hidden.element_size() > REPLAY_MAX_BYTES:
        return None  # (with the cache on disk, the recorded inputs are spilled beside it instead)
    target = common_ancestor(block, [lm.module.get_submodule(n) for n in names])
    if target is None:
        return None
    rel = next(n for n, m in block.named_modules() if m is target)
    return f"{prefix}.{rel}", target
