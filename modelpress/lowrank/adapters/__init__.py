"""Adapters through PEFT (LoRA, DoRA, VeRA, AdaLoRA, IA3), QLoRA on our quantised layers.

PEFT itself does the adapters; modelpress gives it a LoRA layer for its quantised linears
(:mod:`.quant_layer`), registers that layer with PEFT once (:mod:`.dispatch`), and drives
attach / train / merge with checks and an error report (:mod:`.adapt`). Nothing here imports
PEFT at module level: it is an optional dependency (``pip install 'modelpress[peft]'``).
"""
from .adapt import AdapterConfig, AdapterMethod, MergeReport, attach, merge_adapter, resolve_targets, train_adapter

__all__ = ["AdapterConfig", "AdapterMethod", "MergeReport", "attach", "merge_adapter", "resolve_targets",
           "train_adapter"]
