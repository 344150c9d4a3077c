"""Reading a folder written by ``modelpress.export.saving.save_compressed``.

Loading reads safetensors only (no pickle), checks every file's sha256 against the manifest,
rebuilds the model's skeleton from ``config.json`` and installs each compressed layer from the
class its manifest entry names (importing only those classes' modules, see
:mod:`modelpress.core.layers`).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..core.errors import ModelpressError
from ..core.layers import install_packed_layers
from ..core.outputs import MANIFEST
from .archspec import detect_spec
from .loaded import LoadedModel, companion_files, hf_auto_class, read_json, try_tokenizer

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
FORMAT_VERSION = 1


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def verify_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Every file listed in the manifest exists with the recorded sha256."""
    for name, digest in manifest.get("files", {}).items():
        p = folder / name
        if not p.is_file():
            raise ModelpressError(f"{folder}: file {name} listed in {MANIFEST} is missing")
        if sha256_file(p) != digest:
            raise ModelpressError(f"{p}: sha256 does not match {MANIFEST} (truncated or modified file)")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a corrupt file is a one-line error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelpressError(f"cannot read {path}: {str(e).splitlines()[0]}") from None


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a single-file or sharded (index.json) output."""
    if (folder / INDEX).exists():
        shards = sorted(set(read_json(folder / INDEX)["weight_map"].values()))
        out: dict[str, torch.Tensor] = {}
        for sh in shards:
            out.update(read_safetensors(folder / sh))
        return out
    return read_safetensors(folder / WEIGHTS)


def load_compressed(folder: str | Path, *, trust_remote_code: bool = False, verify: bool = True) -> LoadedModel:
    """Rebuild a model saved by :func:`save_compressed` (packed layers stay packed)."""
    folder = Path(folder)
    manifest = read_json(folder / MANIFEST)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ModelpressError(f"{folder}: unsupported modelpress format version {manifest.get('format_version')}")
    if verify:
        verify_files(folder, manifest)
    tensors = _expand_ties(read_weights(folder), manifest)
    model = _skeleton(folder, trust_remote_code, manifest.get("model_class"))
    install_packed_layers(model, manifest["layers"], tensors)
    _load_rest(model, tensors, manifest)
    model.eval()
    return _wrap_loaded(model, folder, manifest)


def _skeleton(folder: Path, trust_remote_code: bool, model_class: str | None = None) -> nn.Module:
    """The model's architecture with fresh weights: the class the manifest names when transformers
    has it (a config converted from GGUF carries no ``architectures``), else the auto class."""
    import transformers

    if not (folder / "config.json").exists():
        raise ModelpressError(f"{folder}: no config.json; a plain nn.Module output must be rebuilt by its own code "
                              "and filled with modelpress.export.saving.load_into(module, folder)")
    config = transformers.AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    cls = getattr(transformers, model_class, None) if model_class and model_class.isidentifier() else None
    if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
        return cls(config)
    return hf_auto_class(config).from_config(config, trust_remote_code=trust_remote_code)


def _expand_ties(tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Give every key of a tie group (stored once, under its first key) its tensor, so a compressed
    layer that shares a tensor with the rest (a masked-LM head's bias) is built from its own keys."""
    for group in manifest.get("tied", []):
        for k in group[1:]:
            tensors[k] = tensors[group[0]]
    return tensors


def _load_rest(model: nn.Module, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> None:
    """Load the tensors outside the compressed layers, then share exactly the tensors the saved model
    shared (the manifest's ``tied`` groups). The skeleton's own ties (``tie_word_embeddings``) are
    not trusted: a compressed head no longer shares the embedding (its class has no ``weight`` for
    transformers' ``tie_weights`` to tie), and a tie the saved model had broken must stay broken."""
    groups = [list(g) for g in manifest.get("tied", [])]
    _untie_undeclared(model, groups)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    packed = tuple(n + "." for n in manifest.get("layers", {}))  # installed already from their tensors
    missing = [k for k in missing if not k.startswith(packed)]
    if unexpected:
        raise ModelpressError(f"weights file has tensors the model does not: {', '.join(unexpected[:5])}")
    if missing:
        raise ModelpressError(f"weights file lacks tensors: {', '.join(missing[:5])}")
    for group in groups:
        src = _get_tensor(model, group[0])
        for k in group[1:]:
            _set_tensor(model, k, src)


def _untie_undeclared(model: nn.Module, groups: list[list[str]]) -> None:
    """Give a parameter its own copy where the skeleton shares it with a key outside its tie group."""
    group_of = {k: i for i, g in enumerate(groups) for k in g}
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owner = first.setdefault(id(p), name)
        if owner != name and (name not in group_of or group_of.get(owner) != group_of[name]):
            _set_tensor(model, name, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))


def _get_tensor(model: nn.Module, key: str) -> torch.Tensor:
    mod, _, attr = key.rpartition(".")
    return getattr(model.get_submodule(mod) if mod else model, attr)


def _set_tensor(model: nn.Module, key: str, t: torch.Tensor) -> None:
    """Point parameter / buffer ``key`` at ``t``'s storage (a tie, not a copy), keeping its kind."""
    mod, _, attr = key.rpartition(".")
    m = model.get_submodule(mod) if mod else model
    if attr in m._parameters:
        old = m._parameters[attr]
        m._parameters[attr] = t if isinstance(t, nn.Parameter) else nn.Parameter(
            t.detach(), requires_grad=old is not None and old.requires_grad)
    elif attr in m._buffers:
        m._buffers[attr] = t.detach()


def load_into(module: nn.Module, folder: str | Path) -> nn.Module:
    """Fill a freshly built plain ``nn.Module`` from a modelpress folder (for models without a config)."""
    folder = Path(folder)
    manifest = read_json(folder / MANIFEST)
    verify_files(folder, manifest)
    tensors = _expand_ties(read_weights(folder), manifest)
    install_packed_layers(module, manifest["layers"], tensors)
    _load_rest(module, tensors, manifest)
    return module


def _wrap_loaded(model: nn.Module, folder: Path, manifest: dict[str, Any]) -> LoadedModel:
    tok = None
    if (folder / "tokenizer.bin").exists():
        from .llama2c import Llama2cTokenizer
        from .tokenizers import Llama2cTextTokenizer

        tok = Llama2cTextTokenizer(Llama2cTokenizer(folder / "tokenizer.bin"))
    elif any(folder.glob("tokenizer*")):
        tok = try_tokenizer(str(folder))
    return LoadedModel(model, detect_spec(model), tok, str(folder), "modelpress", add_bos=bool(manifest.get("add_bos")),
                       manifest=manifest, layer_formats=manifest.get("layers", {}), files=[folder / MANIFEST],
                       companions=companion_files(folder))
