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
    tensors = read_weights(folder)
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


def _load_rest(model: nn.Module, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> None:
    for group in manifest.get("tied", []):
        src = group[0]
        for k in group[1:]:
            tensors[k] = tensors[src]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    packed = tuple(n + "." for n in manifest.get("layers", {}))  # installed already from their tensors
    missing = [k for k in missing if not k.startswith(packed)]
    if unexpected:
        raise ModelpressError(f"weights file has tensors the model does not: {', '.join(unexpected[:5])}")
    if missing:
        raise ModelpressError(f"weights file lacks tensors: {', '.join(missing[:5])}")
    if hasattr(model, "tie_weights") and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        model.tie_weights()


def load_into(module: nn.Module, folder: str | Path) -> nn.Module:
    """Fill a freshly built plain ``nn.Module`` from a modelpress folder (for models without a config)."""
    folder = Path(folder)
    manifest = read_json(folder / MANIFEST)
    verify_files(folder, manifest)
    tensors = read_weights(folder)
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
