"""Compressed layer classes and how a saved folder names them.

Every compressed layer class (``QuantLinear``, ``SparseLayer``, ``ThresholdLinear`` ...) registers
here under its ``layer_tag`` and provides ``manifest_entry() -> dict`` (JSON: format, shape,
bias ...) and ``from_saved(info, tensors) -> nn.Module`` (``tensors``: its own state dict).
A manifest entry records the tag *and the module that defines the class*, so loading a saved
folder imports exactly the layer classes it holds.
"""
from __future__ import annotations

import importlib
from typing import Any

import torch
import torch.nn as nn

from .config import Registry
from .errors import ModelpressError

SAVED_LAYERS: Registry[type[nn.Module]] = Registry("compressed layer",
                                                   packages=("modelpress.quant", "modelpress.sparsity", "modelpress.lowrank"))
#: Tag and module of manifest entries written before entries named their class (quantised linears).
DEFAULT_TAG, DEFAULT_MODULE = "quant", "modelpress.quant.qlinear"


def is_compressed(m: nn.Module) -> bool:
    """Whether ``m`` is an instance of a registered compressed layer class."""
    tag = getattr(m, "layer_tag", None)
    return tag is not None and SAVED_LAYERS.holds(tag) and isinstance(m, SAVED_LAYERS.get(tag))


def transforms_activations(m: nn.Module) -> bool:
    """Whether a compressed layer changes its input at run time (quantises activations, zeroes small
    or unpredicted ones), declared by its class as ``transforms_activations = True``. Its output then
    depends on more than a dense weight: a plain transformers folder cannot reproduce it.

    Example:
        >>> transforms_activations(nn.Linear(2, 2))
        False
    """
    return bool(getattr(type(m), "transforms_activations", False))


def layer_formats(model: nn.Module) -> dict[str, dict[str, Any]]:
    """name -> manifest entry (``layer``, ``module``, ``transforms_activations`` when the class does,
    and the class's own fields) of every compressed layer held in memory (an offloaded one, on the
    meta device, was recorded with its checkpoint)."""
    return {name: {"layer": m.layer_tag, "module": type(m).__module__,
                   **({"transforms_activations": True} if transforms_activations(m) else {}), **m.manifest_entry()}
            for name, m in model.named_modules() if is_compressed(m) and not _offloaded(m)}


def _offloaded(m: nn.Module) -> bool:
    return any(t.is_meta for t in list(m.parameters()) + list(m.buffers()))


def saved_layer_class(info: dict[str, Any]) -> type[nn.Module]:
    """The class of a manifest entry, importing only the module the entry names (ours or a plugin's)."""
    tag = info.get("layer", DEFAULT_TAG)
    module = info.get("module") or (DEFAULT_MODULE if tag == DEFAULT_TAG else None)
    if not SAVED_LAYERS.holds(tag) and module:
        from .plugins import plugin_modules

        if not (module == "modelpress" or module.startswith("modelpress.") or module in plugin_modules()):
            raise ModelpressError(f"saved layer class {tag!r} names module {module!r}, which is neither modelpress's "
                                  "nor an installed modelpress plugin's; refusing to import it")
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ModelpressError(f"saved layer class {tag!r} needs module {module!r}: {e}") from None
    return SAVED_LAYERS.get(tag)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the module called ``name`` (dotted path) by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def load_resized(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """``module.load_state_dict(tensors, strict=False)``, except that a tensor whose shape differs from
    the module's (a block a stage resized: experts dropped or merged) replaces the parameter / buffer
    instead of failing. Sizes that modules cache as attributes are the resizing stage's to restore."""
    own = module.state_dict(keep_vars=True)
    for key in [k for k, t in tensors.items() if k in own and tuple(own[k].shape) != tuple(t.shape)]:
        parent, _, attr = key.rpartition(".")
        m = module.get_submodule(parent) if parent else module
        old, new = own[key], tensors.pop(key)
        if attr in m._parameters:
            m._parameters[attr] = nn.Parameter(new.clone(), requires_grad=old.requires_grad)
        else:
            m._buffers[attr] = new.clone()
    module.load_state_dict(tensors, strict=False)


def install_packed_layers(model: nn.Module, layers: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Replace each layer named in ``layers`` by its saved class, built from its own tensors (which are
    taken out of ``tensors``; what remains belongs to the rest of the model)."""
    for name, info in layers.items():
        prefix = name + "."
        own = {k[len(prefix):]: tensors.pop(k) for k in list(tensors) if k.startswith(prefix) and "." not in k[len(prefix):]}
        set_submodule(model, name, saved_layer_class(info).from_saved(info, own))
