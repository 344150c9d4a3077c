"""Adapters through PEFT: attach, train on our trainer, merge (re-quantising a quantised base).

Nothing here re-implements an adapter: :class:`AdapterConfig` becomes PEFT's own config
(``LoraConfig``, ``VeraConfig``, ``AdaLoraConfig``, ``IA3Config``), ``peft.get_peft_model`` wraps
the model, the adapter saves in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``)
and plain ``PeftModel.from_pretrained`` loads it back. What modelpress adds: checks that name what
is wrong before PEFT starts (targets that do not exist, a method PEFT cannot put on a quantised
layer), training on :class:`~modelpress.distill.trainer.Trainer` with the quantised base frozen
and packed, and :func:`merge_adapter`, which reports the error that re-quantising adds.

Example:
    >>> lm = mp.load("out/smollm2-qlora-nf4")                                          # doctest: +SKIP
    >>> pm = attach(lm.module, AdapterConfig(method="lora", r=16))                      # doctest: +SKIP
    >>> train_adapter(pm, training_for(lm, "shakespeare.txt"), TrainConfig(steps=80))    # doctest: +SKIP
    >>> pm.save_pretrained("adapter")                                                  # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
import torch.nn as nn
from pydantic import Field, model_validator

from ...core.config import Config
from ...core.errors import ModelpressError
from ...distill.losses import Batch
from ...distill.trainer import TrainConfig, TrainData, Trainer, TrainResult
from .quant_layer import QUANTISED_BASES, refuse_requantize


def require_peft() -> Any:
    """The ``peft`` module, or a one-line error saying how to install it (an optional dependency)."""
    try:
        import peft
    except ModuleNotFoundError as e:
        if e.name != "peft":
            raise
        raise ModelpressError("adapters need PEFT: pip install 'modelpress[peft]'") from e
    return peft


class AdapterMethod(str, Enum):
    """PEFT methods modelpress drives; LoRA and DoRA also run on quantised bases."""

    LORA = "lora"
    DORA = "dora"
    VERA = "vera"
    ADALORA = "adalora"
    IA3 = "ia3"

    @property
    def on_quantised(self) -> bool:
        """Whether PEFT can wrap our quantised layers with this method (through our LoRA layer)."""
        return self in (AdapterMethod.LORA, AdapterMethod.DORA)


class AdapterConfig(Config):
    """Which adapter, its size, and where it goes.

    ``targets``: module names or name suffixes as PEFT matches them (``q_proj`` matches
    ``model.layers.0.self_attn.q_proj``); None: every linear layer except the output head.
    ``r`` is the rank (VeRA: the shared projections' rank; AdaLoRA: the initial rank, pruned to
    ``target_r`` by the end of training). ``alpha`` scales LoRA/DoRA/AdaLoRA updates by ``alpha / r``.
    """

    method: AdapterMethod = AdapterMethod.LORA
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: tuple[str, ...] | None = None
    target_r: int = Field(4, ge=1, description="AdaLoRA: average rank kept at the end")
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _adalora_prunes(self) -> "AdapterConfig":
        if self.method is AdapterMethod.ADALORA and self.target_r >= self.r:
            raise ValueError(f"adalora prunes rank r={self.r} down to target_r; target_r {self.target_r} must be smaller")
        return self

    def to_peft(self, targets: list[str], total_steps: int | None = None) -> Any:
        """PEFT's config for this adapter on the modules ``targets``."""
        peft = require_peft()

        m, common = self.method, {"target_modules": list(targets), "task_type": "CAUSAL_LM"}
        if m in (AdapterMethod.LORA, AdapterMethod.DORA):
            return peft.LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                                   use_dora=m is AdapterMethod.DORA, **common)
        if m is AdapterMethod.VERA:
            return peft.VeraConfig(r=self.r, vera_dropout=self.dropout, projection_prng_key=self.seed, **common)
        if m is AdapterMethod.IA3:
            return peft.IA3Config(feedforward_modules=[], **common)
        if not total_steps:
            raise ModelpressError("AdaLoRA needs the number of training steps (its rank budget follows a schedule)")
        warm = max(1, total_steps // 5)  # AdaLoRA's warm-up and final phases, a fifth of training each
        return peft.AdaLoraConfig(init_r=self.r, target_r=self.target_r, lora_alpha=self.alpha,
                                  lora_dropout=self.dropout, total_step=total_steps, tinit=warm,
                                  tfinal=min(warm, total_steps - warm - 1), deltaT=max(1, total_steps // 10), **common)


# ---- where the adapter goes ----------------------------------------------------------------------
def adaptable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Linear layers an adapter can wrap (dense or quantised), by name; the output head excluded."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, *QUANTISED_BASES)) and m is not out_emb and not _inside_quantised(n, model)}


def _inside_quantised(name: str, model: nn.Module) -> bool:
    """A linear that is part of a compressed layer (a CompensatedLinear's factors) is not a target."""
    parent = name.rpartition(".")[0]
    return bool(parent) and isinstance(model.get_submodule(parent), QUANTISED_BASES)


def resolve_targets(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """The names PEFT gets for ``cfg.targets`` (default: every linear's last name part), after
    refusing names that match no linear (PEFT's suffix match) and layers the method cannot wrap;
    the errors name what exists."""
    layers = adaptable_layers(model)
    if not layers:
        raise ModelpressError("the model has no linear layer an adapter can wrap")
    wanted = list(cfg.targets or sorted({n.rpartition(".")[2] for n in layers}))
    hits = {t: [n for n in layers if n == t or n.endswith("." + t)] for t in wanted}
    missing = [t for t, ns in hits.items() if not ns]
    if missing:
        others = [n for n, _ in model.named_modules() if any(n == t or n.endswith("." + t) for t in missing)]
        why = f" ({', '.join(others[:3])} {'is' if len(others) == 1 else 'are'} not a linear layer)" if others else ""
        raise ModelpressError(f"adapter targets {missing} match no linear layer of the model{why}; "
                              f"linear layers here: {', '.join(sorted({n.rpartition('.')[2] for n in layers}))}")
    _refuse_quantised({n: layers[n] for ns in hits.values() for n in ns}, cfg.method)
    return wanted


def _refuse_quantised(chosen: dict[str, nn.Module], method: AdapterMethod) -> None:
    quantised = {n: m for n, m in chosen.items() if isinstance(m, QUANTISED_BASES)}
    if quantised and not method.on_quantised:
        n, m = next(iter(quantised.items()))
        raise ModelpressError(f"{method.value} cannot wrap a quantised layer ({type(m).__name__} at {n}, and "
                              f"{len(quantised) - 1} more): PEFT's {method.value} layers wrap nn.Linear only; "
                              "use lora or dora on a quantised base (QLoRA), or a dense model")


def attach(model: nn.Module, cfg: AdapterConfig, total_steps: int | None = None) -> Any:
    """``peft.get_peft_model(model, cfg as PEFT config)`` after the checks of :func:`resolve_targets`;
    the base is frozen by PEFT, only the adapter trains."""
    peft = require_peft()
    from .dispatch import register_with_peft

    register_with_peft()  # also when peft was imported before modelpress by a path the hook missed
    targets = resolve_targets(model, cfg)
    torch.manual_seed(cfg.seed)  # the adapter's initialisation
    return peft.get_peft_model(model, cfg.to_peft(targets, total_steps))


# ---- training ------------------------------------------------------------------------------------
def lm_step_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy through the model's own loss (so AdaLoRA adds its orthogonality
    term); returns (loss, tokens scored)."""
    mask = batch.mask()
    labels = batch.input_ids.masked_fill(~mask, -100)  # (B, T); the model shifts them
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels)
    return out.loss, int(mask.sum())


class _AdaLoraBudget:
    """Trainer hooks driving AdaLoRA's rank allocation. It scores ranks from each step's gradients,
    so it runs before the optimizer step; the update then moves masked entries again (Adam's
    momentum), so after the step the current rank pattern is applied once more, as saved."""

    def __init__(self, peft_model: Any) -> None:
        self.peft_model = peft_model

    def on_gradients(self, step: int, model: nn.Module) -> None:
        self.peft_model.base_model.update_and_allocate(step)

    def on_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        tuner = self.peft_model.base_model
        pattern = tuner.peft_config[tuner.trainable_adapter_name].rank_pattern
        if pattern:
            tuner.rankallocator.mask_using_rank_pattern(tuner.model, pattern)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def train_adapter(peft_model: Any, data: TrainData, train: TrainConfig, *, progress: bool = True,
                  workdir: str | None = None) -> TrainResult:
    """Train the adapter of ``peft_model`` on next-token prediction over ``data``; quantised layers
    stay packed and frozen (gradients flow through their dequantised matmul into the adapter)."""
    is_ada = type(peft_model.peft_config[peft_model.active_adapter]).__name__ == "AdaLoraConfig"
    trainer = Trainer(peft_model, lm_step_loss, data, train, workdir=workdir, progress=progress,
                      description="adapter", hooks=_AdaLoraBudget(peft_model) if is_ada else None,
                      train_quantised=False)
    result = trainer.train()
    peft_model.eval()
    return result


# ---- merging -------------------------------------------------------------------------------------
@dataclass
class MergeReport:
    """What merging cost. Per re-quantised layer (:func:`~.quant_layer.merge_error`): ``weight``,
    ``||Q(W') - W'|| / ||W'||`` with ``W'`` the merged dense weight, and ``delta``, the same error over
    ``||W' - W||`` (the share of the adapter's update the rounding lost). On a probe batch:
    ``||y_merged - y_adapter|| / ||y_adapter||`` of the logits against the unmerged adapter model."""

    layer_errors: dict[str, dict[str, float]] = field(default_factory=dict)
    output_rel_error: float | None = None
    probe_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        def stat(key: str, f: Any) -> float | None:
            vals = [e[key] for e in self.layer_errors.values()]
            return f(vals) if vals else None

        mean = lambda v: sum(v) / len(v)  # noqa: E731
        return {"requantised_layers": len(self.layer_errors), "output_rel_error": self.output_rel_error,
                "probe_tokens": self.probe_tokens, "weight_rel_error_mean": stat("weight", mean),
                "weight_rel_error_max": stat("weight", max), "delta_lost_mean": stat("delta", mean),
                "delta_lost_max": stat("delta", max), "layer_errors": self.layer_errors}


def merge_adapter(peft_model: Any, probe_ids: torch.Tensor | None = None, *,
                  dense: bool = False) -> tuple[nn.Module, MergeReport]:
    """Merge the adapter into the base and unload PEFT. A quantised base is re-quantised in its own
    format (refused, before anything changes, when a wrapped base cannot be); with ``dense`` it
    becomes a plain ``nn.Linear`` holding ``W + ΔW`` instead: exact, at fp32 size. Why both: an
    update smaller than the format's step mostly rounds away when re-quantised (the report says how
    much, ``delta_lost``)."""
    wrappers = {n: m for n, m in peft_model.named_modules() if hasattr(m, "merge_errors")}
    for n, m in wrappers.items():
        m.merge_to_dense = dense
        if not dense:
            refuse_requantize(m.get_base_layer(), n)
    before = _logits(peft_model, probe_ids)
    merged = peft_model.merge_and_unload()
    rep = MergeReport({n: e for n, m in wrappers.items() for e in m.merge_errors.values()})
    if probe_ids is not None:
        after = _logits(merged, probe_ids)
        rep.output_rel_error = float((after - before).norm() / before.norm().clamp_min(1e-12))
        rep.probe_tokens = int(probe_ids.numel())
    return merged, rep


def _logits(model: nn.Module, ids: torch.Tensor | None) -> torch.Tensor | None:
    if ids is None:
        return None
    with torch.no_grad():
        return model(input_ids=ids).logits.float()  # (B, T, V)
