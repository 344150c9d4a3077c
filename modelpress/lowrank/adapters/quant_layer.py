"""PEFT's LoRA (and DoRA) around our quantised linears: the frozen base of QLoRA.

``QuantLinear`` is not an ``nn.Linear``, so PEFT needs a LoRA layer that knows it: the forward is
PEFT's (``base(x) + B(A(dropout(x))) * scaling``, gradients flow through the dequantised base
matmul into the adapter only), and the two places where PEFT reads a dense ``weight`` are given
the dequantised one: DoRA's column norms and merging. Merging cannot add the delta to packed
codes, so it dequantises, adds, and quantises again with the layer's own format and group size;
the error that re-quantisation adds is recorded per adapter in ``merge_errors`` (:func:`merge_error`).
With ``merge_to_dense`` the merged layer is a plain ``nn.Linear`` holding ``W + ΔW`` instead (exact).

The class is built on first use because PEFT is an optional dependency and every module under
``modelpress.lowrank`` is imported when a registry lists its names.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn as nn

from ...core.errors import ModelpressError
from ...quant.qlinear import QuantLinear
from ..layer import CompensatedLinear

#: Base layer types our LoRA layer wraps: packed quantised linears, and those plus an EoRA correction.
QUANTISED_BASES: tuple[type[nn.Module], ...] = (QuantLinear, CompensatedLinear)


class DenseView:
    """What PEFT's DoRA code reads from a base layer (``weight``, ``bias``, ``parameters()``),
    with ``weight`` the dequantised (out, in) matrix of a quantised one."""

    def __init__(self, base: nn.Module) -> None:  # a QuantLinear or CompensatedLinear
        self.weight = base.dequantized_weight()
        self.bias = base.bias

    def parameters(self) -> list[torch.Tensor]:
        return []


class FrozenBaseMatmul(torch.autograd.Function):
    """``base(x)`` for a frozen quantised ``base`` whose backward dequantises the weight again
    instead of keeping it: autograd would otherwise hold every layer's dense (out, in) weight
    from forward to backward, giving back the memory QLoRA saves (bitsandbytes does the same)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, base: nn.Module) -> torch.Tensor:  # x: (..., in)
        ctx.base = base
        return base(x)  # (..., out)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:  # (..., out)
        W = ctx.base.dequantized_weight().to(grad_out.dtype)  # (out, in), the same weight forward used
        return grad_out @ W, None


def requantize(base: QuantLinear, dense: torch.Tensor) -> QuantLinear:
    """``dense`` (out, in) quantised in ``base``'s own format and group size (same bias): on the
    layer's own grid (its stored scales / zero points / absmax, which GPTQ, AWQ and HQQ fitted with
    care, and which a small update rarely leaves) or on a grid re-fitted to ``dense``, whichever
    rounds closer."""
    dense = dense.detach().float()
    own = base.fmt.quantize(dense, stored=base.qtensor().params)
    refit = base.fmt.quantize(dense)
    err = lambda qt: float((qt.dequantize() - dense).norm())  # noqa: E731
    return QuantLinear.from_linear_weight(own if err(own) <= err(refit) else refit, base.bias)


def dense_linear(base: nn.Module, dense: torch.Tensor) -> nn.Linear:
    """A plain ``nn.Linear`` holding ``dense`` (out, in) and ``base``'s bias: a merge that keeps the
    adapter exactly, at fp32 size."""
    lin = nn.Linear(dense.shape[1], dense.shape[0], bias=base.bias is not None)
    with torch.no_grad():
        lin.weight.copy_(dense)
        if base.bias is not None:
            lin.bias.copy_(base.bias)
    return lin.requires_grad_(False)


def merge_error(W: torch.Tensor, merged: torch.Tensor, requantised: torch.Tensor) -> dict[str, float]:
    """What re-quantising the merged weight cost, for base ``W``, merged ``W' = W + ΔW`` and
    ``Q(W')``, all (out, in): ``weight`` = ||Q(W') - W'|| / ||W'||, and ``delta`` =
    ||Q(W') - W'|| / ||W' - W|| (the share of the adapter's update lost; 0 is a perfect merge)."""
    lost = (requantised - merged).norm()
    return {"weight": float(lost / merged.norm().clamp_min(1e-12)),
            "delta": float(lost / (merged - W).norm().clamp_min(1e-12))}


def refuse_requantize(base: nn.Module, name: str = "") -> None:
    """A merge target must be a packed ``QuantLinear`` (its format is how we re-quantise). A
    ``CompensatedLinear`` (quantised base + a low-rank correction fitted to that base's rounding
    error, EoRA) takes adapters but not a merge: re-quantising would void the correction."""
    if not isinstance(base, QuantLinear):
        where = f" ({name})" if name else ""
        raise ModelpressError(
            f"cannot merge an adapter into a {type(base).__name__}{where}: its weight cannot be re-quantised "
            "in its own format (only QuantLinear bases re-quantise, and dense nn.Linear merges exactly); "
            "keep the adapter unmerged (save it with save_pretrained) or merge into dense layers (dense=True, --merge-dense)")


@functools.cache
def dora_variant() -> type:
    """PEFT's DoRA variant reading the dequantised weight of our base (built on first use)."""
    from peft.tuners.lora.dora import DoraLinearLayer
    from peft.tuners.lora.variants import DoraLinearVariant

    class QuantDoraLayer(DoraLinearLayer):
        """DoRA's magnitude vector over a quantised base: PEFT's maths on the dequantised weight."""

        def update_layer(self, *, base_layer: nn.Module, **kw: Any) -> None:
            super().update_layer(base_layer=DenseView(base_layer), **kw)

        def forward(self, x: torch.Tensor, *, base_layer: nn.Module, **kw: Any) -> torch.Tensor:
            return super().forward(x, base_layer=DenseView(base_layer), **kw)

    class QuantDoraVariant(DoraLinearVariant):
        @staticmethod
        def init(module: nn.Module, adapter_name: str, **kwargs: Any) -> None:
            if not module.lora_magnitude_vector:
                module.adapter_layer_names = module.adapter_layer_names[:] + ("lora_magnitude_vector",)
            layer = QuantDoraLayer(fan_in_fan_out=False)
            layer.update_layer(base_layer=module.get_base_layer(), lora_A=module.lora_A[adapter_name].weight,
                               lora_B=module.lora_B[adapter_name].weight, scaling=module.scaling[adapter_name])
            module.lora_magnitude_vector[adapter_name] = layer

    return QuantDoraVariant


def merged_weight(layer: Any, adapter: str, W: torch.Tensor) -> torch.Tensor:
    """The dense weight (out, in) with ``adapter`` merged into base weight ``W``: ``W + ΔW`` for
    LoRA, ``m / ||W + ΔW||_row * (W + ΔW)`` for DoRA (PEFT's own formula)."""
    delta = layer.get_delta_weight(adapter)  # (out, in), scaling included
    if adapter not in layer.lora_variant:
        return W + delta
    norm = torch.linalg.norm(W + delta, dim=1).detach()  # (out,)
    return (layer.lora_magnitude_vector[adapter].weight / norm).view(-1, 1) * (W + delta)


@functools.cache
def quant_lora_linear() -> type:
    """The LoRA layer class for a ``QuantLinear`` base (built on first use; see module docstring).

    Example:
        >>> from peft import LoraConfig, get_peft_model                      # doctest: +SKIP
        >>> cfg = LoraConfig(target_modules=["q_proj"], r=8)                  # doctest: +SKIP
        >>> cfg._register_custom_module({QuantLinear: quant_lora_linear()})  # doctest: +SKIP
        >>> peft_model = get_peft_model(qlora_model, cfg)                     # doctest: +SKIP
    """
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.tuners_utils import check_adapters_to_merge

    class QuantLoraLinear(nn.Module, LoraLayer):
        """LoRA / DoRA adapters around a frozen ``QuantLinear``; merging re-quantises."""

        def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, r: int = 0,
                     lora_alpha: int = 1, **kwargs: Any) -> None:
            if config.lora_bias:
                raise ValueError("LoRA on a QuantLinear base does not support lora_bias")
            super().__init__()
            LoraLayer.__init__(self, base_layer)
            self.fan_in_fan_out = False
            self.merge_errors: dict[str, dict[str, float]] = {}  # adapter -> merge_error(...)
            self.merge_to_dense = False  # True: merging gives a dense nn.Linear (exact) instead of re-quantising
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

        def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
            return module.in_features, module.out_features

        @property
        def lora_variants(self) -> dict[tuple[str, ...], Any]:
            return {(): None, ("use_dora",): dora_variant()}

        def resolve_lora_variant(self, *, config: Any, **kwargs: Any) -> Any:
            try:
                return super().resolve_lora_variant(config=config, **kwargs)
            except ValueError as e:
                raise ValueError(f"LoRA on a quantised base (QuantLinear) supports plain LoRA and DoRA "
                                 f"(use_dora) only: {e}") from e

        def get_delta_weight(self, adapter: str) -> torch.Tensor:
            """ΔW = B A * scaling, (out, in)."""
            return self.lora_B[adapter].weight @ self.lora_A[adapter].weight * self.scaling[adapter]

        def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
            """Dequantise, add each adapter, re-quantise in the base's format (error in ``merge_errors``),
            or keep the sum dense with ``merge_to_dense``."""
            for name in check_adapters_to_merge(self, adapter_names):
                if name not in self.lora_A:
                    continue
                base = self.get_base_layer()
                if not self.merge_to_dense:
                    refuse_requantize(base)
                W = base.dequantized_weight()  # (out, in)
                merged = merged_weight(self, name, W).detach()
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs in the merged weights: adapter {name} seems broken")
                if self.merge_to_dense:
                    self.base_layer = dense_linear(base, merged)
                else:
                    self.base_layer = requantize(base, merged)
                    self.merge_errors[name] = merge_error(W, merged, self.base_layer.dequantized_weight())
                self.merged_adapters.append(name)

        def unmerge(self) -> None:
            raise ModelpressError("a merge into a quantised base re-quantised it: it cannot be unmerged exactly; "
                                  "reload the base and the adapter instead")

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:  # x: (..., in)
            self._check_forward_args(x, *args, **kwargs)
            if kwargs.pop("adapter_names", None) is not None:
                raise ValueError("mixed adapter batches (adapter_names) are not supported on a QuantLinear base")
            if torch.is_grad_enabled() and x.requires_grad and not args and not kwargs:
                result = FrozenBaseMatmul.apply(x, self.base_layer)  # (..., out)
            else:
                result = self.base_layer(x, *args, **kwargs)  # (..., out), the dequantised base matmul
            if self.disable_adapters or self.merged:
                return result
            for name in self.active_adapters:
                if name not in self.lora_A:
                    continue
                A, B, drop, s = self.lora_A[name], self.lora_B[name], self.lora_dropout[name], self.scaling[name]
                xa = self._cast_input_dtype(x, A.weight.dtype)
                if name in self.lora_variant:
                    result = self.lora_variant[name].forward(self, active_adapter=name, x=xa, result=result)
                else:
                    result = result + B(A(drop(xa))) * s
            return result

        def __repr__(self) -> str:
            return "lora." + super().__repr__()

    QuantLoraLinear.__qualname__ = "QuantLoraLinear"
    return QuantLoraLinear
