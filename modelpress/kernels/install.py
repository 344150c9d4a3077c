"""Swap every :class:`QuantLinear` and factorised layer of a model for its selected kernel's module.

Done once at load time (``install_kernels``); the model code is never edited, only its quantised
linears (op ``linear``) and float low-rank factor pairs (op ``lowrank``) are replaced. The plan
returned says which kernel each layer got and, for each fallback, why, and a fallback from a
kernel the user named is also raised as a warning.

Example:
    >>> plan = install_kernels(lm.module, dtype=torch.bfloat16)   # doctest: +SKIP
    >>> plan.counts()                                              # doctest: +SKIP
    {'int4pack': 210}
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from ..core.errors import ModelpressError
from ..quant.formats.base import QTensor
from ..quant.qlinear import QuantLinear
from . import cpu, cuda, reference  # noqa: F401  (registers the built-in kernels)
from .lowrank import OP as LOWRANK, FactorPair, factored_layers, install_pair
from .reference import KernelLinear
from ..core.layers import set_submodule as set_module
from .registry import AUTO, REFERENCE, KernelPlan, Weight, requested_kernel, select_kernel


def install_kernels(model: nn.Module, prefer: str | None = None, dtype: torch.dtype = torch.bfloat16,
                    device: torch.device | str | None = None) -> KernelPlan:
    """Replace each QuantLinear and factorised layer in ``model`` by its kernel's module (in place).

    Quantised linears go first, so that a quantised factor or a CompensatedLinear's quantised base
    has its own format kernel (and plan row) before its factorised parent is looked at.

    Args:
        model: any module holding :class:`QuantLinear`, ``LowRankLinear`` or ``CompensatedLinear`` layers.
        prefer: kernel name, ``auto`` or ``reference`` (default: $MODELPRESS_KERNEL, else auto).
        dtype: activation dtype the kernels compute in (bfloat16 is where int4pack/int8pack are fast).
        device: where the model runs (default: where its first buffer is).

    Returns:
        The :class:`KernelPlan`.
    """
    name = requested_kernel(prefer)
    dev = torch.device(device) if device is not None else _device_of(model)
    plan = KernelPlan(name)
    for lname, ql in [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]:
        if (new := _install_one(ql.qtensor(), ql.bias, "linear", dev, dtype, plan, lname)) is not None:
            set_module(model, lname, new)
    for lname, layer in factored_layers(model):
        if (new := _install_one(FactorPair.of(layer), layer.B.bias, LOWRANK, dev, dtype, plan, lname)) is not None:
            set_module(model, lname, install_pair(layer, new))
    if name != AUTO:
        for line in plan.notes():
            warnings.warn(f"modelpress kernels: {line}", stacklevel=2)
    return plan


def _install_one(w: QTensor | Weight, bias: torch.Tensor | None, op: str, dev: torch.device, dtype: torch.dtype,
                 plan: KernelPlan, lname: str) -> nn.Module | None:
    """The kernel module for one layer's weight (None: the reference, keep the layer); adds its plan row."""
    choice = select_kernel(w, dev, plan.requested, op)
    plan.rows.append((lname, choice.kernel.name, choice.note))
    if choice.kernel.name == REFERENCE:
        return None
    return choice.kernel.build(w, bias.detach() if bias is not None else None, dev, dtype)


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


#: (fused attribute, the projections it replaces, on which child of a decoder layer)
FUSIONS = (("qkv_fused", ("q_proj", "k_proj", "v_proj"), "self_attn"), ("gate_up_fused", ("gate_proj", "up_proj"), "mlp"))


def fuse_projections(model: nn.Module) -> int:
    """Stack q/k/v and gate/up of each Llama-style layer into one QuantLinear each (in place).

    Why: at batch 1 a small model's decode time is mostly per-call overhead of many small matmuls;
    one matmul over the stacked rows gives the same outputs (rows are independent and every
    parameter of a row-wise integer grid belongs to its row) in 2 calls instead of 5. The
    originals are removed, so only :class:`~modelpress.kernels.generate.LlamaRunner` (which
    uses the fused modules) can run the model afterwards. Call before :func:`install_kernels`.
    Returns the number of fused modules made; layers whose projections are not same-format,
    row-wise quantised linears are left unfused.
    """
    layers = getattr(getattr(model, "model", None), "layers", None) or []
    made = 0
    for layer in layers:
        for attr, names, child in FUSIONS:
            parent = getattr(layer, child, None)
            mods = [getattr(parent, n, None) for n in names] if parent is not None else []
            if not mods or not all(isinstance(m, QuantLinear) and m.bias is None for m in mods):
                continue
            qts = [m.qtensor() for m in mods]
            try:
                stacked = QTensor.stack_rows(qts)
            except ModelpressError:  # not row-wise, or formats / widths differ
                continue
            parent.add_module(attr, QuantLinear.from_linear_weight(stacked, None))
            setattr(parent, attr + "_sizes", [q.shape[0] for q in qts])  # how the runner splits the output
            for n in names:
                delattr(parent, n)
            made += 1
    return made
