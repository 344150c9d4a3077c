"""Hugging Face writer: a plain ``save_pretrained`` folder that ``from_pretrained`` reloads.

Quantised layers become ordinary ``nn.Linear`` (or GPT-2 ``Conv1D``) weights holding our
dequantised values, in ``dtype`` (float32 keeps them exact; float16/bfloat16 halve the size).
Pruned or structurally shrunk models are already plain modules with an updated config, so they
are written as they are.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ...core.errors import ModelpressError
from ...core.layers import transforms_activations
from ...models.layers import set_submodule
from ...models.loading import LoadedModel
from ...quant.qlinear import QuantLinear
from ..plan import ExportReport, OnUnsupported, dense_weight, describe_format
from . import WriterOption, register_writer, atomic_output, original_class, save_tokenizer, skeleton

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@register_writer("hf", summary="dense save_pretrained folder that transformers loads", options=(
    WriterOption("dtype", "weight dtype of the dense folder", "float32", ("float32", "float16", "bfloat16")),))
def write_hf(lm: LoadedModel, output: str | Path, *, dtype: str = "float32", overwrite: bool = False,
             on_unsupported: OnUnsupported = OnUnsupported.REFUSE, **_: Any) -> ExportReport:
    """Write a dense ``save_pretrained`` folder (safetensors) of ``lm``.

    Layers that change their input at run time (W8A8, LLM.int8(), activation sparsity) have no
    dense equivalent: refused by default, written as their weight alone with ``on_unsupported``
    ``dequantize`` / ``requantize`` (the folder's outputs then differ from the compressed model's).

    Example:
        >>> write_hf(lm, "out/smol-dense", dtype="bfloat16")  # doctest: +SKIP
    """
    if not hasattr(lm.module, "save_pretrained"):
        raise ModelpressError("HF export needs a transformers model (this one has no save_pretrained)")
    if dtype not in _DTYPES:
        raise ModelpressError(f"--dtype {dtype}: choose one of {', '.join(_DTYPES)}")
    report = ExportReport("hf", str(output))
    _check_weight_only(lm, on_unsupported, report)
    dense = _dense_copy(lm, report)
    dense.to(_DTYPES[dtype])
    with atomic_output(output, overwrite) as tmp:
        dense.save_pretrained(str(tmp), safe_serialization=True)
        save_tokenizer(lm, tmp)
        report.write(tmp / "export_report.json")
    return report


def _check_weight_only(lm: LoadedModel, on_unsupported: OnUnsupported, report: ExportReport) -> None:
    """Refuse (or, by policy, note) the layers whose run-time input transform a dense folder drops."""
    active = [(n, m.layer_tag) for n, m in lm.module.named_modules() if transforms_activations(m)]
    if not active:
        return
    names = ", ".join(f"{n} ({tag})" for n, tag in active[:3]) + (" ..." if len(active) > 3 else "")
    if on_unsupported == OnUnsupported.REFUSE:
        raise ModelpressError(f"hf: {len(active)} layer(s) quantise or sparsify their activations at run time, which "
                              f"a dense transformers folder cannot: {names}; --on-unsupported dequantize writes their "
                              "weights alone (outputs then differ), or export to compressed-tensors")
    report.notes.append(f"--on-unsupported {on_unsupported.value}: {len(active)} layer(s) written as their dequantised "
                        f"weight without the run-time activation step ({names}): outputs differ from the compressed model's")


def _dense_copy(lm: LoadedModel, report: ExportReport) -> nn.Module:
    """A copy of the model with every compressed layer replaced by its original dense class."""
    from transformers.pytorch_utils import Conv1D

    skel = skeleton(lm)
    layers = {n: m for n, m in lm.module.named_modules() if isinstance(m, QuantLinear) or getattr(m, "layer_tag", None)}
    # a compressed layer inside another (a low-rank layer's quantised factor) is part of its parent's dense weight
    layers = {n: m for n, m in layers.items() if not any(n.startswith(p + ".") for p in layers)}
    # copy only what stays (the compressed layers are rebuilt below, never deep-copied)
    stash = {n: m for n, m in layers.items()}
    for n in layers:
        set_submodule(lm.module, n, nn.Identity())
    try:
        dense = copy.deepcopy(lm.module)
    finally:
        for n, m in stash.items():
            set_submodule(lm.module, n, m)
    for name, m in layers.items():
        w = dense_weight(m, name).to(torch.float32)  # (out, in)
        bias = getattr(m, "bias", None)
        if original_class(skel, name) is Conv1D:
            new: nn.Module = Conv1D(w.shape[0], w.shape[1])
            new.weight.data = w.t().contiguous()
        else:
            new = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
            new.weight.data = w.contiguous()
        if bias is not None:
            new.bias.data = bias.detach().to(torch.float32).clone()
        set_submodule(dense, name, new)
        report.add(f"{name}.weight", describe_format(m), "float", "dequantized")
    _keep_compressed_head(dense, set(layers))
    if hasattr(dense, "tie_weights"):
        dense.tie_weights()
    return dense


def _keep_compressed_head(dense: nn.Module, replaced: set[str]) -> None:
    """A compressed output head (a masked-LM decoder, an ``lm_head`` not ignored) holds its own
    dequantised weight: untie it from the input embedding in the config, or ``tie_weights`` here and
    ``from_pretrained`` later would put the float embedding back in its place."""
    get_out, cfg = getattr(dense, "get_output_embeddings", None), getattr(dense, "config", None)
    head = get_out() if callable(get_out) else None
    if head is not None and cfg is not None and any(dense.get_submodule(n) is head for n in replaced):
        cfg.tie_word_embeddings = False
