"""Saving compressed models safely (the reading side is :mod:`modelpress.models.saved`).

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
"""
from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .. import __version__
from ..core.layers import layer_formats
from ..core.outputs import MANIFEST, REPORT_FILES, TEMP_MARKER, atomic_output
from ..core.outputs import save_safetensors as save_file
from ..models.loading import LoadedModel
from ..models.saved import (FORMAT_VERSION, INDEX, WEIGHTS, load_compressed, load_into, read_safetensors,  # noqa: F401
                            read_weights, sha256_file, verify_files)

#: One metadata key only: safetensors writes its metadata map in random order, so two keys would
#: give files that differ from run to run. The producer's version is in the manifest instead.
ST_METADATA = {"format": "pt"}


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


def _config_as_saved(model: nn.Module, cfg: Any) -> Any:
    """``cfg``, or a copy saying ``tie_word_embeddings: false`` when the model's output head no longer
    shares the input embedding's weight (a compressed masked-LM decoder or ``lm_head``): the folder's
    two tensors differ, and a reader that ties them would replace the head."""
    import copy

    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if not (getattr(cfg, "tie_word_embeddings", False) and callable(get_in) and callable(get_out)):
        return cfg
    try:
        emb, head = get_in(), get_out()
    except NotImplementedError:  # (a model class without embedding accessors)
        return cfg
    if head is None or emb is None or getattr(head, "weight", None) is getattr(emb, "weight", None):
        return cfg
    out = copy.deepcopy(cfg)
    out.tie_word_embeddings = False
    return out


def _versions() -> dict[str, str]:
    import transformers

    return {"modelpress": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


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
        if not getattr(cfg, "architectures", None):  # (a GGUF's converted config has none) so any reader
            cfg.architectures = [type(lm.module).__name__]  # rebuilds the class with the head, not the bare model
        (tmp / "config.json").write_text(_config_as_saved(lm.module, cfg).to_json_string())
    if lm.tokenizer is not None:
        lm.tokenizer.save(tmp)
    for name, src in lm.companions.items():  # e.g. sentence-transformers' modules.json and pooling config
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, tmp / name)
    manifest = {
        "format_version": FORMAT_VERSION, "versions": _versions(),
        "source": lm.source, "source_sha256": source_digest(lm) if lm.kind != "module" else None,
        "kind": lm.kind, "add_bos": lm.add_bos, "model_class": type(lm.module).__name__,
        "recipe": recipe.to_dict() if hasattr(recipe, "to_dict") else recipe,
        "calibration": (report or {}).get("calibration"),
        "layers": layers, "tied": ties,
        "files": {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*"))
                  if p.is_file() and p.name != TEMP_MARKER},
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


