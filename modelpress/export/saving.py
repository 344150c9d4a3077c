"""Safe saving and loading of compressed models.

Layout of an output folder::

    model.safetensors   packed codes, scales, zero points and the untouched tensors
    config.json         the model's HF config (when it has one)
    tokenizer files     when the model has a tokenizer
    modelpress.json     manifest: recipe, versions, per-layer formats, sha256 of every file

    report.json/.md     the run's report (timings, memory): not hashed, not reproducible

Writes go to a hidden temporary folder renamed into place only when complete, so an interrupted
save never leaves a half-written output, and an existing folder is replaced only when it is a
modelpress output (:mod:`modelpress.core.outputs`). The model files are byte-reproducible: the
same model, recipe and calibration data give the same sha256 for every file but the reports.
Loading reads safetensors only (no pickle) and checks every file's sha256 against the manifest.
"""
from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .. import __version__
from ..core.config import Registry
from ..core.errors import ModelpressError
from ..core.outputs import MANIFEST, REPORT_FILES, TEMP_MARKER, atomic_output
from ..core.outputs import save_safetensors as save_file
from ..models.loading import LoadedModel, read_json
from ..quant.qlinear import QuantLinear

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
FORMAT_VERSION = 1
#: One metadata key only: safetensors writes its metadata map in random order, so two keys would
#: give files that differ from run to run. The producer's version is in the manifest instead.
ST_METADATA = {"format": "pt"}

#: Compressed layer classes other than ``QuantLinear``, keyed by their manifest ``layer`` tag. A class
#: registers itself and provides ``manifest_entry() -> dict`` (JSON: format, shape, bias ...) and
#: ``from_saved(info, tensors) -> nn.Module`` (``tensors``: its own state dict, bias included).
LAYER_CLASSES: Registry[type[nn.Module]] = Registry("compressed layer")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def _state_dict_without_ties(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[list[str]]]:
    """State dict with shared tensors kept once (safetensors refuses aliases); the tie groups."""
    sd = model.state_dict()
    seen: dict[tuple[int, int, tuple], str] = {}
    out, ties = {}, {}
    for k, v in sd.items():
        if v.is_meta:  # an offloaded block (low-memory mode): streamed from its checkpoint instead
            out[k] = v
            continue
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) if v.numel() else None
        if key is not None and key in seen:
            ties.setdefault(seen[key], [seen[key]]).append(k)
            continue
        if key is not None:
            seen[key] = k
        out[k] = v.detach().contiguous().cpu()
    return out, list(ties.values())


def _versions() -> dict[str, str]:
    import transformers

    return {"modelpress": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def layer_formats(model: nn.Module) -> dict[str, dict[str, Any]]:
    """name -> {format, shape, bias, bits_per_weight} for every quantised layer."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            out[name] = {"format": m.fmt.to_dict(), "shape": [m.out_features, m.in_features],
                         "bias": m.bias is not None, "bits_per_weight": 8.0 * m.stored_bytes() / (m.out_features * m.in_features)}
        elif getattr(m, "layer_tag", None) in LAYER_CLASSES:
            out[name] = {"layer": m.layer_tag, **m.manifest_entry()}
    return out


def save_compressed(lm: LoadedModel, output: str | Path, *, recipe: Any = None, report: dict | None = None,
                    overwrite: bool = False) -> Path:
    """Write ``lm`` to ``output`` atomically; refuse an existing folder unless ``overwrite``.

    Example:
        >>> save_compressed(lm, "out/smollm2-w4", recipe=recipe)  # doctest: +SKIP
    """
    with atomic_output(output, overwrite) as tmp:
        _write_folder(lm, tmp, recipe, report)
    return Path(output)


def _write_folder(lm: LoadedModel, tmp: Path, recipe: Any, report: dict | None) -> None:
    from ..eval.report import markdown, with_output_size
    from ..models.fingerprint import source_digest

    sd, ties = _state_dict_without_ties(lm.module)
    layers = layer_formats(lm.module)
    if lm.lazy is not None and lm.lazy.offloaded:
        layers.update(_write_shards(lm, sd, tmp))
    else:
        save_file(sd, str(tmp / WEIGHTS), metadata=ST_METADATA)
    cfg = getattr(lm.module, "config", None)
    if cfg is not None and hasattr(cfg, "to_json_string"):
        (tmp / "config.json").write_text(cfg.to_json_string())
    if lm.tokenizer is not None:
        lm.tokenizer.save(tmp)
    manifest = {
        "format_version": FORMAT_VERSION, "versions": _versions(),
        "source": lm.source, "source_sha256": source_digest(lm) if lm.kind != "module" else None,
        "kind": lm.kind, "add_bos": lm.add_bos, "model_class": type(lm.module).__name__,
        "recipe": recipe.to_dict() if hasattr(recipe, "to_dict") else recipe,
        "calibration": (report or {}).get("calibration"),
        "layers": layers, "tied": ties,
        "files": {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file() and p.name != TEMP_MARKER},
        "reports": list(REPORT_FILES),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if report is not None:
        report = with_output_size(report, weights_bytes(tmp))
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str))
        (tmp / "report.md").write_text(markdown(report))


def weights_bytes(folder: Path) -> int:
    """Bytes of the weight files in a saved folder (what "size on disk" means in reports)."""
    from ..eval.size import disk_bytes

    return disk_bytes(folder) or 0


def _write_shards(lm: LoadedModel, sd: dict[str, torch.Tensor], tmp: Path) -> dict[str, Any]:
    """Low-memory save: one shard per offloaded block, streamed from its checkpoint, plus the rest.

    Returns the per-layer formats of the streamed blocks (full names) for the manifest.
    """
    from safetensors.torch import load_file

    lazy = lm.lazy
    rest = {k: v for k, v in sd.items() if not v.is_meta}
    weight_map = {k: "model-rest.safetensors" for k in rest}
    save_file(rest, str(tmp / "model-rest.safetensors"), metadata=ST_METADATA)
    layers: dict[str, Any] = {}
    for i, (path, formats) in sorted(lazy.offloaded.items()):
        name = f"model-block{i:05d}.safetensors"
        blk = {f"{lazy.prefix}.{i}.{k}": v for k, v in load_file(str(path)).items()}
        save_file(blk, str(tmp / name), metadata=ST_METADATA)
        weight_map.update({k: name for k in blk})
        layers.update({f"{lazy.prefix}.{i}.{k}": v for k, v in formats.items()})
    (tmp / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    return layers


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
    model = _skeleton(folder, trust_remote_code)
    _install_packed_layers(model, manifest["layers"], tensors)
    _load_rest(model, tensors, manifest)
    model.eval()
    return _wrap_loaded(model, folder, manifest)


def _skeleton(folder: Path, trust_remote_code: bool) -> nn.Module:
    import transformers

    from ..models.loading import hf_auto_class

    if not (folder / "config.json").exists():
        raise ModelpressError(f"{folder}: no config.json; a plain nn.Module output must be rebuilt by its own code "
                              "and filled with modelpress.export.saving.load_into(module, folder)")
    config = transformers.AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    return hf_auto_class(config).from_config(config, trust_remote_code=trust_remote_code)


def _install_packed_layers(model: nn.Module, layers: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    from ..models.layers import set_submodule
    from ..quant.formats import format_from_dict

    for name, info in layers.items():
        prefix = name + "."
        own = {k[len(prefix):]: tensors.pop(k) for k in list(tensors) if k.startswith(prefix) and "." not in k[len(prefix):]}
        if "layer" in info:
            set_submodule(model, name, _layer_class(info["layer"]).from_saved(info, own))
            continue
        fmt = format_from_dict(info["format"])
        bias = own.pop("bias", None)
        set_submodule(model, name, QuantLinear(fmt, tuple(info["shape"]), own, bias))


def _layer_class(tag: str) -> type[nn.Module]:
    """The registered class of a manifest ``layer`` tag (method modules register their layers)."""
    if tag not in LAYER_CLASSES:
        from ..pipeline.recipe import register_builtin_methods

        register_builtin_methods()
    return LAYER_CLASSES.get(tag)


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
    _install_packed_layers(module, manifest["layers"], tensors)
    _load_rest(module, tensors, manifest)
    return module


def _wrap_loaded(model: nn.Module, folder: Path, manifest: dict[str, Any]) -> LoadedModel:
    from ..models.archspec import detect_spec
    from ..models.loading import try_tokenizer

    tok = None
    if (folder / "tokenizer.bin").exists():
        from ..models.llama2c import Llama2cTokenizer
        from ..models.tokenizers import Llama2cTextTokenizer

        tok = Llama2cTextTokenizer(Llama2cTokenizer(folder / "tokenizer.bin"))
    elif any(folder.glob("tokenizer*")):
        tok = try_tokenizer(str(folder))
    return LoadedModel(model, detect_spec(model), tok, str(folder), "modelpress", add_bos=bool(manifest.get("add_bos")),
                       manifest=manifest, layer_formats=manifest.get("layers", {}), files=[folder / MANIFEST])
