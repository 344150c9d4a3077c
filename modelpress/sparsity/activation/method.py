"""TEAL and Deja Vu as calibrated recipe stages on the sequential engine.

Both calibrate block by block: block ``i`` is calibrated on the outputs of blocks ``< i`` already
made sparse, so each threshold / predictor sees the activations it will see at inference.
Put them last in a recipe: they wrap whatever linears are there (plain or quantised).
"""
from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn as nn
from pydantic import Field

from ...calib.capture import capture_inputs
from ...core.errors import ModelpressError
from ...models.archspec import ArchSpec, get_submodule
from ...models.layers import linear_shape, set_submodule
from ...models.loading import LoadedModel
from ...core.method import METHODS, LayerRecord, MethodConfig, MethodEntry, RunContext
from ...models.selection import select_layers
from ...calib.observed import layer_groups, shared_input_sets
from ...calib.blocks import BlockInputs, last_module
from .dejavu import DejaVuMLP, neuron_scores, recall, topk_mask, train_predictor
from .teal import ThresholdLinear, magnitude_threshold


class TEALConfig(MethodConfig):
    """TEAL: zero inputs with ``|x| <= t`` of the selected linears; ``t`` per input at the target sparsity.

    Layers that read the same tensor (q/k/v, gate/up, from the ArchSpec) share one threshold.

    Example:
        >>> TEALConfig(sparsity=0.4).targets
        ['role:*']
    """

    needs_float_weights: ClassVar[bool] = False  # wraps the layer, whatever its storage

    method: Literal["teal"] = "teal"
    targets: list[str] = ["role:*"]
    sparsity: float = Field(0.4, ge=0, lt=1, description="fraction of each input's entries zeroed")
    max_calib_tokens: int = Field(8192, gt=0, description="tokens per input used for the quantile (first batches)")


class DejaVuConfig(MethodConfig):
    """Deja Vu: a low-rank predictor per MLP picks the ``(1 - sparsity) * I`` neurons to compute.

    An MLP is converted when its ``down_proj`` is selected by ``targets`` / ``ignore``.

    Example:
        >>> DejaVuConfig(sparsity=0.5, rank=64).rank
        64
    """

    needs_float_weights: ClassVar[bool] = False  # wraps the layer, whatever its storage

    method: Literal["dejavu"] = "dejavu"
    targets: list[str] = ["role:down_proj"]
    sparsity: float = Field(0.5, ge=0, lt=1, description="fraction of MLP neurons not computed per token")
    rank: int = Field(128, gt=0, description="hidden width of the predictor W2 relu(W1 x)")
    epochs: int = Field(4, gt=0)
    lr: float = Field(1e-2, gt=0)
    max_calib_tokens: int = Field(16384, gt=0, description="training tokens per MLP (first batches)")
    holdout: float = Field(0.1, gt=0, lt=1, description="fraction of those tokens kept out to measure recall")
    seed: int = 0


# ---- shared helpers ------------------------------------------------------------------------------
def _sample_batches(inputs: BlockInputs, max_tokens: int) -> int:
    """How many of the engine's batches hold ``max_tokens`` tokens (observing more costs time, not accuracy)."""
    per_batch = inputs.batch_size * inputs.hidden.shape[1]
    return max(1, math.ceil(max_tokens / per_batch))


# ---- TEAL ----------------------------------------------------------------------------------------
class TEALStage:
    """Per block: capture each input's |x| (first calibration batches), take the quantile, wrap the layers."""

    def __init__(self, cfg: TEALConfig, selected: list[str]) -> None:
        self.cfg, self.selected = cfg, set(selected)

    def process_block(self, lm: LoadedModel, index: int, block: nn.Module, prefix: str,
                      inputs: BlockInputs, ctx: RunContext) -> None:
        names = [n for n in sorted(self.selected) if n.startswith(prefix + ".")]
        n_batches = _sample_batches(inputs, self.cfg.max_calib_tokens)
        for group in layer_groups(lm.spec, prefix, names):
            sets = shared_input_sets(lm.spec, prefix, group)
            mods = {s[0]: lm.module.get_submodule(s[0]) for s in sets}
            seen: dict[str, list[torch.Tensor]] = {n: [] for n in mods}

            def sink(n: str, x: torch.Tensor) -> None:
                seen[n].append(x.detach().reshape(-1, x.shape[-1]).abs().float())  # (n_tok, in)

            with capture_inputs(mods, sink):
                inputs.run(block, stop_after=last_module(block, mods.values()), max_batches=n_batches)
            for s in sets:
                self._wrap(lm, s, torch.cat(seen[s[0]]), ctx)

    def _wrap(self, lm: LoadedModel, names: list[str], abs_x: torch.Tensor, ctx: RunContext) -> None:
        t = magnitude_threshold(abs_x, self.cfg.sparsity)
        achieved = float((abs_x <= t).float().mean())
        for n in names:
            m = lm.module.get_submodule(n)
            set_submodule(lm.module, n, ThresholdLinear(m, t))
            ctx.layers.append(LayerRecord(n, "teal", shape=linear_shape(m),
                                          notes=[f"threshold={t:.5g}", f"calibration sparsity={achieved:.4f}"]))


# ---- Deja Vu -------------------------------------------------------------------------------------
class DejaVuStage:
    """Per block: capture the MLP input, label the true top-k neurons, train the predictor, wrap the MLP."""

    def __init__(self, cfg: DejaVuConfig, selected: list[str], spec: ArchSpec) -> None:
        self.cfg, self.selected, self.spec = cfg, set(selected), spec
        self.mlp_rel = spec.roles["down_proj"].rpartition(".")[0]

    def process_block(self, lm: LoadedModel, index: int, block: nn.Module, prefix: str,
                      inputs: BlockInputs, ctx: RunContext) -> None:
        if f"{prefix}.{self.spec.roles['down_proj']}" not in self.selected:
            return
        roles = {r: get_submodule(block, self.spec.roles[r]) if r in self.spec.roles else None for r in
                 ("gate_proj", "up_proj", "down_proj")}
        absent = [self.spec.roles[r] for r, m in roles.items() if m is None and r in self.spec.roles]
        if absent:
            raise ModelpressError(f"Deja Vu: {prefix} has no {', '.join(absent)} (ArchSpec {self.spec.name!r})")
        from transformers.activations import ACT2FN

        act = ACT2FN[_hidden_act(lm)]
        X = self._capture(block, roles["up_proj"], inputs)  # (N, d)
        n_neurons = linear_shape(roles["up_proj"])[0]
        k = max(1, round((1 - self.cfg.sparsity) * n_neurons))
        labels = torch.cat([topk_mask(neuron_scores(roles["gate_proj"], roles["up_proj"], x, act), k) for x in X.split(4096)])  # (N, I)
        n_hold = max(1, int(self.cfg.holdout * X.shape[0]))
        w1, w2 = train_predictor(X[:-n_hold], labels[:-n_hold], self.cfg.rank, epochs=self.cfg.epochs,
                                 lr=self.cfg.lr, seed=self.cfg.seed + index)
        new = DejaVuMLP(roles["gate_proj"], roles["up_proj"], roles["down_proj"], _hidden_act(lm), w1, w2, k)
        r = recall(new.selector(new, X[-n_hold:]), labels[-n_hold:])
        set_submodule(lm.module, f"{prefix}.{self.mlp_rel}", new)
        ctx.layers.append(LayerRecord(f"{prefix}.{self.mlp_rel}", "dejavu", shape=(n_neurons, X.shape[1]),
                                      notes=[f"k={k}/{n_neurons}", f"held-out recall={r:.4f}"]))

    def _capture(self, block: nn.Module, up: nn.Module, inputs: BlockInputs) -> torch.Tensor:
        seen: list[torch.Tensor] = []
        with capture_inputs({"up": up}, lambda _n, x: seen.append(x.detach().reshape(-1, x.shape[-1]).float())):
            inputs.run(block, stop_after=up, max_batches=_sample_batches(inputs, self.cfg.max_calib_tokens))
        return torch.cat(seen)


def _hidden_act(lm: LoadedModel) -> str:
    act = getattr(getattr(lm.module, "config", None), "hidden_act", None)
    if not isinstance(act, str):
        raise ModelpressError("Deja Vu needs the MLP activation's name (config.hidden_act); this model has none")
    return act


def teal_stage(lm: LoadedModel, cfg: TEALConfig) -> TEALStage:
    return TEALStage(cfg, [n for n, _ in select_layers(lm, cfg)])


def dejavu_stage(lm: LoadedModel, cfg: DejaVuConfig) -> DejaVuStage:
    spec = lm.spec
    if spec is None or "down_proj" not in spec.roles or "up_proj" not in spec.roles or spec.transposed:
        raise ModelpressError("Deja Vu needs an architecture with up_proj/down_proj roles stored as nn.Linear "
                              f"(got {spec.name if spec else 'an unknown architecture'})")
    mlp = {spec.roles[r].rpartition(".")[0] for r in ("gate_proj", "up_proj", "down_proj") if r in spec.roles}
    if len(mlp) != 1 or "" in mlp:  # DejaVuMLP replaces that module and is called as mlp(x)
        paths = ", ".join(spec.roles[r] for r in ("gate_proj", "up_proj", "down_proj") if r in spec.roles)
        raise ModelpressError(f"Deja Vu replaces the MLP module holding gate/up/down_proj; architecture {spec.name!r} "
                              f"has them in different modules ({paths})")
    return DejaVuStage(cfg, [n for n, _ in select_layers(lm, cfg)], spec)


METHODS.register("teal")(MethodEntry(TEALConfig, None, needs_calibration=True, block_stage=teal_stage,
                                     summary="TEAL: magnitude-thresholded linear inputs, per-input calibrated sparsity"))
METHODS.register("dejavu")(MethodEntry(DejaVuConfig, None, needs_calibration=True, block_stage=dejavu_stage,
                                       summary="Deja Vu: learned low-rank predictor of active MLP neurons"))
