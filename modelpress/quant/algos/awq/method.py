"""AWQ as a recipe stage: inputs from the sequential engine's hooks, maths in ``awq.py``.

Per block, for each ``ArchSpec.scale_mappings`` entry ``(previous op, roles it feeds)`` in block
order: capture the shared input of those roles, search the scales, fold ``1 / s`` into the
previous op (a norm from ``spec.norms`` or a linear from ``spec.roles``) and ``s`` into the
consumers. Later mappings are captured after earlier folds. Then every selected layer is clipped
(optional) and, with ``quantize: true``, rounded to the format; with ``quantize: false`` the block
is left in float (rescaled and clipped) for a following stage such as GPTQ.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from ....calib.capture import capture_inputs
from ....calib.stats import ActStatsAccumulator
from ....models.archspec import get_submodule, role_of
from ....models.layers import linear_shape, linear_weight
from ....models.loading import LoadedModel
from ....core.method import METHODS, MethodConfig, MethodEntry, RunContext
from ....models.selection import layer_weight, select_layers
from ....calib.blocks import BlockInputs, last_module
from ...apply import install_quantized, record_quantized
from ...fields import FormatField
from ...formats import IntFormat
from ...granularity import PerGroup
from .awq import (clip_plan, fold_into_linear_out, fold_into_norm, quantize_clipped, scale_linear_in, search_clip,
                  search_scales, search_scales_by, weight_mean)


class AWQConfig(MethodConfig):
    """AWQ (Lin et al., 2023): activation-aware scaling (+ clipping) before weight quantisation.

    Example:
        >>> AWQConfig(format={"type": "int", "bits": 3, "granularity": 64}, quantize=False).grid
        20
    """

    method: Literal["awq"] = "awq"
    format: FormatField = IntFormat(bits=4, granularity=PerGroup(size=128))
    grid: int = Field(20, gt=0, description="alphas tried, alpha = i / grid")
    duo_scaling: bool = Field(False, description="s = x^a / w^(1-a) (AutoAWQ) instead of the paper's s = x^a")
    clip: bool = Field(True, description="search a clipping range per group after scaling (auto_clip)")
    clip_grid: int = Field(20, gt=0, description="clip shrink step is 1 / clip_grid")
    max_shrink: float = Field(0.5, ge=0, lt=1, description="largest fraction of the range clipped away")
    clip_skip_roles: list[str] = Field(["q_proj", "k_proj", "qkv_proj"],
                                       description="roles never clipped (attention scores are sensitive)")
    quantize: bool = Field(True, description="round with RTN here; false: leave it to a following stage")
    max_tokens: int = Field(4096, gt=0, description="tokens sampled from the cache to evaluate the losses")
    loss: Literal["module", "layer"] = Field(
        "module", description="score scales by the output of the module holding the layers (attention, MLP), "
                              "as the reference does, or by each layer's own output")


@dataclass
class _Mapping:
    """One resolved scale mapping: the op producing the shared input and the layers consuming it."""

    prev: str  # role or norm name, as in the spec
    prev_name: str  # full module name
    prev_module: nn.Module | None
    prev_is_norm: bool
    targets: dict[str, nn.Module]  # full name -> linear

    @property
    def first(self) -> str:
        """Name of the first target: its input is the mapping's shared input."""
        return next(iter(self.targets))


class _InputSample:
    """Mean |x| per channel over every token, plus a strided sample of at most ``max_tokens`` tokens."""

    def __init__(self, in_features: int, stride: int, max_tokens: int) -> None:
        self.stats = ActStatsAccumulator(in_features)
        self.stride, self.max_tokens = stride, max_tokens
        self._rows: list[torch.Tensor] = []

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()  # (batch, seq, in)
        self.stats.update(x)
        self._rows.append(x.reshape(-1, x.shape[-1])[:: self.stride])

    @property
    def X(self) -> torch.Tensor:
        """Sampled tokens (n_tokens, in)."""
        return torch.cat(self._rows, 0)[: self.max_tokens]

    def rescaled(self, s: torch.Tensor) -> "_InputSample":
        """The sample as the layer sees it after ``1 / s`` was folded into its input (x / s per channel).

        Only the token sample is rescaled; the statistics stay those of the unscaled input.
        """
        out = _InputSample(self.stats.in_features, self.stride, self.max_tokens)
        out.stats = self.stats
        X = self.X
        out._rows = [X / s.view(1, -1).to(X.dtype)]
        return out


class AWQStage:
    """Per-block scale search, folding, clipping and (optionally) RTN on the sequential engine."""

    def __init__(self, cfg: AWQConfig, selected: list[str]) -> None:
        self.cfg = cfg
        self.selected = list(selected)
        self._notes: dict[str, str] = {}  # layer -> what its scale search found, for the report

    @torch.no_grad()
    def process_block(self, lm: LoadedModel, index: int, block: nn.Module, prefix: str,
                      inputs: BlockInputs, ctx: RunContext) -> None:
        names = [n for n in self.selected if n.startswith(prefix + ".")]
        if not names:
            return
        check = _FoldCheck(block, inputs)
        maps = [m for prev, roles in (lm.spec.scale_mappings if lm.spec else ())
                if (m := self._resolve(lm, prefix, prev, roles, set(names), ctx)) is not None]
        todo = {n: m for n in names if not _compressed(m := lm.module.get_submodule(n))}
        if len(todo) < len(names):
            ctx.warn("awq: layers already compressed by an earlier stage were left as is (put awq first)")
        if not (self.cfg.clip or self.cfg.quantize):
            todo = {}
        # One pass over the calibration tokens samples every input needed. A fold divides its own
        # targets' inputs by s and leaves every other layer's input unchanged (the folded block
        # computes the same function), so later mappings need no new pass and the clip / rounding
        # inputs are the samples divided by the scales applied.
        want = {**todo, **{m.first: m.targets[m.first] for m in maps}}
        samples = self._observe(block, inputs, want) if want else {}
        for m in maps:
            s_applied = self._scale(m, block, inputs, check, ctx, samples[m.first])
            if s_applied is not None:
                for n in m.targets:
                    if n in samples:
                        samples[n] = samples[n].rescaled(s_applied)
        for n, mod in todo.items():
            self._finish_layer(lm, n, mod, samples[n], ctx)

    # ---- scaling ------------------------------------------------------------------------------
    def _resolve(self, lm: LoadedModel, prefix: str, prev: str, roles: tuple[str, ...], names: set[str],
                 ctx: RunContext) -> _Mapping | None:
        """The mapping's modules, or None (with a warning where it matters) when it cannot be folded."""
        spec = lm.spec
        full = [f"{prefix}.{spec.roles[r]}" for r in roles if r in spec.roles]
        targets = {n: t for n in full if (t := get_submodule(lm.module, n)) is not None}
        if not targets.keys() & names:
            return None  # nothing of this mapping is being compressed here
        path = spec.norms.get(prev) or spec.roles.get(prev)
        m = _Mapping(prev, f"{prefix}.{path}", get_submodule(lm.module, f"{prefix}.{path}") if path else None,
                     prev in spec.norms, targets)
        reason = _unfoldable(m, len(roles), names)
        if reason:
            ctx.warn(f"awq: scale mapping {prev} -> {', '.join(roles)} skipped: {reason}")
            return None
        return m

    def _scale(self, m: _Mapping, block: nn.Module, inputs: BlockInputs, check: _FoldCheck,
               ctx: RunContext, sample: _InputSample) -> torch.Tensor | None:
        """Search and fold the scales of one mapping; the scales folded, or None when nothing was."""
        if sample.stats.ntokens == 0:
            ctx.warn(f"awq: {m.first} received no calibration tokens; not rescaled")
            return None
        W_list = [layer_weight(n, t) for n, t in m.targets.items()]
        if self.cfg.loss == "module":
            objective = _ModuleObjective(block, m.targets, W_list, inputs, self.cfg)
            w_mean = weight_mean(torch.cat(W_list, 0), self.cfg.format) if self.cfg.duo_scaling else None
            res = search_scales_by(objective, sample.stats.mean_abs.float(), self.cfg.grid, w_mean)
            objective.restore()
        else:
            res = search_scales(sample.stats.mean_abs, W_list, sample.X, self.cfg.format,
                                grid=self.cfg.grid, duo_scaling=self.cfg.duo_scaling)
        if bool((res.scales == 1).all()):
            return None  # the identity won: nothing to fold
        undo = _fold(m, res.scales)
        err = check.error()
        if err > check.tolerance:
            undo()
            ctx.warn(f"awq: folding scales into {m.prev} changed the block's float output "
                     f"(relative error {err:.1e}); mapping skipped, check the ArchSpec")
            return None
        note = f"awq: alpha {res.alpha}, scale-search loss {res.best_error / max(res.table[0][1], 1e-30):.2f}x RTN's"
        self._notes.update(dict.fromkeys(m.targets, note))
        return res.scales

    def _observe(self, block: nn.Module, inputs: BlockInputs, mods: dict[str, nn.Module]) -> dict[str, _InputSample]:
        """Run the cached inputs through ``block`` until the last of ``mods`` and sample their inputs."""
        n_tok = inputs.hidden.shape[0] * inputs.hidden.shape[1]
        stride = max(1, math.ceil(n_tok / self.cfg.max_tokens))
        samples = {n: _InputSample(linear_shape(m)[1], stride, self.cfg.max_tokens) for n, m in mods.items()}
        with capture_inputs(mods, lambda n, x: samples[n].update(x)):
            inputs.run(block, stop_before=last_module(block, mods.values()))  # pre-hooks have seen it
        return samples

    # ---- clipping and rounding ----------------------------------------------------------------
    def _finish_layer(self, lm: LoadedModel, name: str, module: nn.Module, sample: _InputSample,
                      ctx: RunContext) -> None:
        W = layer_weight(name, module)  # (out, in), already scaled
        X = sample.X if sample.stats.ntokens else None  # (n_tokens, in)
        Wc, plan = W, None
        if self.cfg.clip and X is not None and role_of(name, lm.module, lm.spec) not in self.cfg.clip_skip_roles:
            plan = clip_plan(W, self.cfg.format)  # tensor-wide parameters of the unclipped weight
            Wc = search_clip(W, X, self.cfg.format, self.cfg.clip_grid, self.cfg.max_shrink, plan)
        if not self.cfg.quantize:
            if Wc is not W:
                linear_weight(module).copy_(Wc.to(module.weight.dtype))
            return
        qt = self.cfg.format.quantize(Wc) if plan is None else quantize_clipped(Wc, plan)
        Q = qt.dequantize()
        out_err = None if X is None else float((X @ (W - Q).T).norm() / (X @ W.T).norm().clamp_min(1e-20))
        install_quantized(lm.module, name, module, qt)
        rec = record_quantized(ctx, "awq", name, W, qt, Q, out_rel_error=out_err)
        if name in self._notes:
            rec.notes.append(self._notes[name])


def _unfoldable(m: _Mapping, n_roles: int, names: set[str]) -> str | None:
    """Why ``1 / s`` cannot be folded into ``m.prev`` and ``s`` into ``m.targets`` (None: it can)."""
    p = m.prev_module
    if p is None:
        return f"{m.prev} is neither a norm nor a role of the architecture spec, or absent from the model"
    if len(m.targets) != n_roles:
        return "some of the layers it feeds are absent from this block"
    if not m.targets.keys() <= names:
        return "not every layer it feeds is selected (the unselected ones must not change)"
    if any(_compressed(t) for t in m.targets.values()):
        return "its layers were already compressed by an earlier stage (put awq first)"
    if m.prev_is_norm and not isinstance(getattr(p, "weight", None), torch.Tensor):
        return f"norm {m.prev} has no weight to fold the scales into"
    if not m.prev_is_norm and (m.prev_name not in names or _compressed(p)):
        return f"{m.prev} is not selected or already compressed (it would have to change)"
    width = p.weight.numel() if m.prev_is_norm else linear_shape(p)[0]
    ins = {linear_shape(t)[1] for t in m.targets.values()}
    if ins != {width}:
        why = "" if m.prev_is_norm else " (grouped-query attention: values are shared by several heads)"
        return f"{m.prev} outputs {width} channels but the layers it feeds take {sorted(ins)}{why}"
    return None


def _compressed(module: nn.Module) -> bool:
    """Already replaced by a compressed layer (no float weight left to rescale)."""
    return bool(getattr(module, "is_compressed_linear", False))


def _fold(m: _Mapping, s: torch.Tensor) -> Callable[[], None]:
    """Divide ``prev``'s output by ``s`` and multiply the targets' inputs by ``s``; returns an undo."""
    touched: list[tuple[torch.Tensor, torch.Tensor]] = []

    def write(dst: torch.Tensor, value: torch.Tensor) -> None:
        touched.append((dst, dst.detach().clone()))
        dst.copy_(value.to(dst.dtype))

    p = m.prev_module
    bias = getattr(p, "bias", None)
    if m.prev_is_norm:
        w, b = fold_into_norm(p.weight.float(), bias.float() if bias is not None else None, s)
        write(p.weight, w)
    else:
        w, b = fold_into_linear_out(linear_weight(p).float(), bias.float() if bias is not None else None, s)
        write(linear_weight(p), w)
    if b is not None:
        write(bias, b)
    for t in m.targets.values():
        write(linear_weight(t), scale_linear_in(linear_weight(t).float(), s))

    def undo() -> None:
        for dst, old in touched:
            dst.copy_(old)

    return undo


class _FoldCheck:
    """The block's float output on the first cached batch, to verify that every fold is exact.

    A spec that maps a norm to layers it does not feed (or a norm computed as ``1 + weight``) would
    silently change the model; comparing outputs catches it for the cost of one forward.
    """

    def __init__(self, block: nn.Module, inputs: BlockInputs) -> None:
        self.block, self.x, self.kwargs = block, next(inputs.batches()), inputs.kwargs
        self.ref = self._out()  # (batch, seq, hidden)
        # 16-bit weights round ``W * s`` to ~3 significant digits: a correct fold still moves the output
        self.tolerance = 1e-4 if self.ref.dtype in (torch.float32, torch.float64) else 3e-2

    def _out(self) -> torch.Tensor:
        out = self.block(self.x, **self.kwargs)
        return out[0] if isinstance(out, tuple) else out

    def error(self) -> float:
        """Relative Frobenius change of the block output since construction."""
        ref = self.ref.float()
        return float((self._out().float() - ref).norm() / ref.norm().clamp_min(1e-20))



class _ModuleObjective:
    """AWQ's loss as in the reference: ``|| M(x) - M_q(x) ||^2`` for the module ``M`` holding the layers.

    ``M`` is the deepest module containing every target (attention for q/k/v, the MLP for
    gate/up, the layer itself for a single target); its inputs are captured on the first cached
    batches and each candidate ``s`` sets the targets to ``Q(W * s) / s`` (the folded function).
    """

    def __init__(self, block: nn.Module, targets: dict[str, nn.Module], W_list: list[torch.Tensor],
                 inputs: BlockInputs, cfg: AWQConfig) -> None:
        self.targets, self.W_list, self.fmt = list(targets.values()), W_list, cfg.format
        self.module = _common_parent(block, self.targets)
        n_batches = max(1, cfg.max_tokens // (inputs.batch_size * inputs.hidden.shape[1]))
        self.calls: list[tuple[tuple, dict, torch.Tensor]] = []

        def grab(_m: nn.Module, args: tuple, kwargs: dict, out: object) -> None:
            self.calls.append((args, dict(kwargs), _first(out).detach().clone()))

        h = self.module.register_forward_hook(grab, with_kwargs=True)
        try:
            inputs.run(block, stop_after=self.module, max_batches=n_batches)
        finally:
            h.remove()

    def __call__(self, s: torch.Tensor) -> float:
        s_row = s.view(1, -1)  # (1, in)
        for t, W in zip(self.targets, self.W_list):
            linear_weight(t).copy_(self.fmt.fake_quantize(W * s_row) / s_row)
        err = 0.0
        for args, kwargs, ref in self.calls:
            err += float((_first(self.module(*args, **kwargs)) - ref).double().pow(2).sum())
        return err

    def restore(self) -> None:
        for t, W in zip(self.targets, self.W_list):
            linear_weight(t).copy_(W)


def _first(out: object) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out  # type: ignore[index,return-value]


def _common_parent(block: nn.Module, targets: list[nn.Module]) -> nn.Module:
    """The deepest submodule of ``block`` containing all ``targets`` (a single target: itself)."""
    if len(targets) == 1:
        return targets[0]
    names = {id(m): n for n, m in block.named_modules()}
    parts = [names[id(t)].split(".") for t in targets]
    common = []
    for segs in zip(*parts):
        if len(set(segs)) != 1:
            break
        common.append(segs[0])
    return block.get_submodule(".".join(common)) if common else block


def awq_stage(lm: LoadedModel, cfg: AWQConfig) -> AWQStage:
    return AWQStage(cfg, [n for n, _ in select_layers(lm, cfg)])


METHODS.register("awq")(MethodEntry(AWQConfig, None, needs_calibration=True, block_stage=awq_stage,
                                    summary="AWQ: activation-aware per-channel scaling (+ clipping) before rounding"))
