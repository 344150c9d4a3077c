"""Swap every :class:`QuantLinear` of a model for the module of its selected kernel.

Done once at load time (``install_kernels``); the model code is never edited, only its quantised
linears are replaced. The plan returned says which kernel each layer got and, for each fallback,
why, and a fallback from a kernel the user named is also raised as a warning.

Example:
    >>> plan = install_kernels(lm.module, dtype=torch.bfloat16)   # doctest: +SKIP
    >>> plan.counts()                                              # doctest: +SKIP
    {'int4pack': 210}
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from ..quant.qlinear import QuantLinear
from . import cpu, cuda, reference  # noqa: F401  (registers the built-in kernels)
from .reference import KernelLinear
from .registry import AUTO, KernelPlan, requested_kernel, select_kernel, set_module


def install_kernels(model: nn.Module, prefer: str | None = None, dtype: torch.dtype = torch.bfloat16,
                    device: torch.device | str | None = None) -> KernelPlan:
    """Replace each QuantLinear in ``model`` by its kernel's module (in place).

    Args:
        model: any module holding :class:`QuantLinear` layers.
        prefer: kernel name, ``auto`` or ``reference`` (default: $MODELPRESS_KERNEL, else auto).
        dtype: activation dtype the kernels compute in (bfloat16 is where int4pack/int8pack are fast).
        device: where the model runs (default: where its first buffer is).

    Returns:
        The :class:`KernelPlan`.
    """
    name = requested_kernel(prefer)
    dev = torch.device(device) if device is not None else _device_of(model)
    plan = KernelPlan(name)
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    for lname, ql in targets:
        qt = ql.qtensor()
        choice = select_kernel(qt, dev, name)
        bias = ql.bias.detach() if ql.bias is not None else None
        new = ql if choice.kernel.name == "reference" else choice.kernel.build(qt, bias, dev, dtype)
        set_module(model, lname, new)
        plan.rows.append((lname, choice.kernel.name, choice.note))
    if name != AUTO:
        for line in plan.notes():
            warnings.warn(f"modelpress kernels: {line}", stacklevel=2)
    return plan


def cast_float_parts(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast parameters and buffers of every module except quantised/kernel linears to ``dtype``.

    ``model.to(dtype)`` would also round a QuantLinear's fp16 scales (changing its weights) and a
    kernel's packed parameters; those keep what they store.
    """
    skip = {id(t) for m in model.modules() if isinstance(m, (QuantLinear, KernelLinear))
            for t in list(m.parameters()) + list(m.buffers())}
    for m in model.modules():
        if isinstance(m, (QuantLinear, KernelLinear)):
            continue
        for k, p in m._parameters.items():
            if p is not None and p.is_floating_point() and id(p) not in skip and p.dtype != dtype:
                m._parameters[k] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
        for k, b in m._buffers.items():
            if b is not None and b.is_floating_point() and id(b) not in skip and b.dtype != dtype:
                m._buffers[k] = b.to(dtype)
    _retie(model)
    return model


def _retie(model: nn.Module) -> None:
    """Re-tie input/output embeddings after casting replaced the shared Parameter."""
    tie = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if tie and hasattr(model, "get_input_embeddings") and hasattr(model, "get_output_embeddings"):
        out = model.get_output_embeddings()
        if isinstance(out, nn.Linear):
            out.weight = model.get_input_embeddings().weight


def _device_of(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")
