"""compressed-tensors writer: the folder vLLM and ``transformers`` load as a quantised model.

Layout: ``model.safetensors`` (float tensors as they are, each quantised Linear as its codec's
tensors), ``config.json`` with ``quantization_config`` in the library's schema (one config group
per distinct scheme, targets = exact module names, status ``compressed``), tokenizer files and
``export_report.json``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ...models.loading import LoadedModel
from ...quant.formats.base import QTensor
from ...quant.qlinear import QuantLinear
from ..codecs.compressed_tensors import codec_for, nearest_representable
from ..plan import (ExportReport, OnUnsupported, Unrepresentable, dense_weight, describe_format,
                    refuse_if_any)
from . import register_writer, atomic_output, original_class, save_tokenizer, skeleton

#: The compressed-tensors release whose schema this writer follows (config ``version``).
CT_SCHEMA_VERSION = "0.20.0"
#: Report note for pruned float layers: compressed-tensors 0.20 removed its sparse compressors
#: (``sparse-bitmask`` / ``sparse-24-bitmask`` are legacy names it can no longer decompress).
SPARSE_DENSE = "sparse layer written dense (compressed-tensors 0.20 has no sparse compressor)"


@register_writer("compressed-tensors", summary="compressed-tensors checkpoint that vLLM loads")
def write_compressed_tensors(lm: LoadedModel, output: str | Path, *, on_unsupported: OnUnsupported = OnUnsupported.REFUSE,
                             overwrite: bool = False, kv_cache: Any = None, **_: Any) -> ExportReport:
    """Export ``lm`` as a compressed-tensors checkpoint.

    ``kv_cache``: calibrated KV-cache quantisation (``modelpress.kernels.kvcache.KVCacheQuant``);
    its ``kv_cache_scheme()`` goes into the config and its per-head ``k_scale`` / ``v_scale``
    tensors into the weights.

    Example:
        >>> write_compressed_tensors(lm, "out/smol-ct")  # doctest: +SKIP
    """
    from safetensors.torch import save_file

    from ..saving import _state_dict_without_ties

    report = ExportReport("compressed-tensors", str(output))
    plan = _plan(lm, on_unsupported)
    sd, _ = _state_dict_without_ties(lm.module)
    groups: dict[str, dict[str, Any]] = {}
    ignore: list[str] = []
    for name, m, action in plan:
        for k in [k for k in sd if k.startswith(name + ".")]:  # the layer's own tensors and its children's
            del sd[k]
        bias = getattr(m, "bias", None)
        if bias is not None:
            sd[f"{name}.bias"] = bias.detach().contiguous()
        if isinstance(action, str):  # dequantise (or a sparse float layer, written dense)
            sd[f"{name}.weight"] = dense_weight(m, name).to(torch.float32).contiguous()
            ignore.append(name)
            sparse = action == SPARSE_DENSE
            report.add(f"{name}.weight", describe_format(m), "float32", "copied" if sparse else "dequantized", action or "")
            continue
        qt, how = action
        codec = codec_for(qt.fmt)
        args = codec.weight_args(qt.fmt, qt.shape)
        key = json.dumps([args, codec.compression_format], sort_keys=True)
        groups.setdefault(key, {"weights": args, "format": codec.compression_format, "targets": []})["targets"].append(name)
        sd.update({f"{name}.{k}": v for k, v in codec.encode(qt).items()})
        report.add(f"{name}.weight", describe_format(m), _target_desc(args, codec.compression_format), how)
    planned = {p[0] for p in plan}
    for n, m in lm.module.named_modules():
        if isinstance(m, nn.Linear) and n not in planned and not any(n.startswith(p + ".") for p in planned):
            ignore.append(n)
    scheme = kv_cache.kv_cache_scheme() if kv_cache is not None else None
    if kv_cache is not None:
        sd.update(kv_cache.scale_state_dict())
        report.notes.append(f"kv_cache_scheme: {scheme}")
    config = _config_with_quantization(lm, groups, ignore, scheme)
    with atomic_output(output, overwrite) as tmp:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        save_tokenizer(lm, tmp)
        report.write(tmp / "export_report.json")
    return report


def _plan(lm: LoadedModel, policy: OnUnsupported) -> list[tuple[str, nn.Module, Any]]:
    """(name, layer, action) per compressed layer: ``(QTensor, "lossless"|"requantized")`` or a
    dequantise reason (str). Refuses, listing every layer, when ``policy`` is ``refuse``."""
    skel = skeleton(lm)
    plan, problems = [], []
    outer: list[str] = []  # a compressed layer inside another (a low-rank layer's quantised factor) is its parent's
    for name, m in lm.module.named_modules():
        if not (isinstance(m, QuantLinear) or getattr(m, "layer_tag", None)) or any(name.startswith(o + ".") for o in outer):
            continue
        outer.append(name)
        if getattr(m, "layer_tag", None) == "sparse" and m.is_compressed_linear:
            plan.append((name, m, SPARSE_DENSE))  # float weights with zeros: nothing to refuse
            continue
        why = _why_unrepresentable(m, original_class(skel, name))
        if why is None:
            plan.append((name, m, (m.qtensor(), "lossless")))
            continue
        problems.append((name, why))
        plan.append((name, m, why))
    refuse_if_any(problems, "compressed-tensors", policy)
    if policy == OnUnsupported.REQUANTIZE:
        plan = [(n, m, _requantize(n, m, a) if isinstance(a, str) else a) for n, m, a in plan]
    return plan


def _why_unrepresentable(m: nn.Module, orig: type[nn.Module] | None) -> str | None:
    if not isinstance(m, QuantLinear):
        return f"modelpress layer {m.layer_tag!r} has no compressed-tensors codec"
    if orig is not None and not issubclass(orig, nn.Linear):
        return f"replaces a {orig.__name__}, not an nn.Linear (compressed-tensors quantises Linear layers)"
    try:
        codec_for(m.fmt).weight_args(m.fmt, (m.out_features, m.in_features))
    except Unrepresentable as e:
        return str(e)
    return None


def _requantize(name: str, m: nn.Module, why: str) -> Any:
    """Re-quantise a QuantLinear's dequantised weight to the nearest representable format (RTN)."""
    if not isinstance(m, QuantLinear):
        return why  # no grid to stay near: written dequantised
    fmt = nearest_representable(m.fmt, (m.out_features, m.in_features))
    qt: QTensor = fmt.quantize(m.dequantized_weight())
    return qt, "requantized"


def _target_desc(args: dict[str, Any], fmt: str) -> str:
    g = args.get("group_size")
    return f"{fmt} {args['type']}{args['num_bits']} {'g' + str(g) if g else args['strategy']}"


def _config_with_quantization(lm: LoadedModel, groups: dict[str, dict[str, Any]], ignore: list[str],
                              kv_cache_scheme: dict[str, Any] | None) -> dict[str, Any]:
    """The model's config.json plus ``quantization_config`` exactly as compressed-tensors dumps it."""
    cfg = lm.module.config.to_dict()
    cfg.pop("quantization_config", None)
    formats = sorted({g["format"] for g in groups.values()})
    config_groups = {
        f"group_{i}": {"targets": sorted(g["targets"]), "weights": g["weights"], "input_activations": None,
                       "output_activations": None, "format": g["format"]}
        for i, g in enumerate(groups.values())
    }
    cfg["quantization_config"] = {
        "config_groups": config_groups,
        "format": formats[0] if len(formats) == 1 else ("mixed-precision" if formats else "dense"),
        "global_compression_ratio": None,
        "ignore": sorted(ignore),
        "kv_cache_scheme": kv_cache_scheme,
        "moe_sparsity_config": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_SCHEMA_VERSION,
    }
    return cfg
