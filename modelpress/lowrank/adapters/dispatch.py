"""Teach PEFT our quantised linears, so its own entry points work on our models unchanged.

PEFT's extension point for a layer type it does not know is ``LoraConfig._register_custom_module
({LayerType: LoraLayerClass})``; its LoRA dispatcher then wraps matching targets with that class
before trying its built-in ones. The mapping lives on each config object, so a config PEFT builds
itself (``PeftModel.from_pretrained(model, adapter_dir)`` reads ``adapter_config.json``) would not
have it. This is the one place where modelpress touches PEFT: :func:`register_with_peft` wraps
``LoraConfig.__post_init__`` so every LoraConfig (AdaLoraConfig inherits it) starts with
``{QuantLinear: QuantLoraLinear, CompensatedLinear: QuantLoraLinear}`` registered through that official method. A mapping a user
registers afterwards overrides ours. It runs when PEFT is imported after ``import modelpress``, or
at once when PEFT was imported first (see :mod:`modelpress.core.import_hooks`).
"""
from __future__ import annotations

from typing import Any

from .quant_layer import QUANTISED_BASES, quant_lora_linear

_MARK = "_modelpress_registers_quant_linear"


def register_with_peft() -> None:
    """Make every new ``peft.LoraConfig`` map our quantised layers (``QUANTISED_BASES``) to our LoRA
    layer (idempotent)."""
    from peft import LoraConfig

    original = LoraConfig.__post_init__
    if getattr(original, _MARK, False):
        return

    def __post_init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self._register_custom_module({cls: quant_lora_linear() for cls in QUANTISED_BASES})

    setattr(__post_init__, _MARK, True)
    __post_init__.__wrapped__ = original  # type: ignore[attr-defined]
    LoraConfig.__post_init__ = __post_init__


def is_registered() -> bool:
    """Whether :func:`register_with_peft` has run in this process."""
    from peft import LoraConfig

    return bool(getattr(LoraConfig.__post_init__, _MARK, False))
