"""What modelpress knows about a loaded model (:class:`LoadedModel`) and the small readers every
loader shares. A leaf module: the loaders, the saved-folder reader and the engine all import it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.nn as nn

from ..core.errors import ModelpressError
from .archspec import ArchSpec
from .tokenizers import HFTokenizer, TextTokenizer


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
        files: the files the model was read from (its content identity, see ``models.fingerprint``).
        revision: the hub commit, for a model downloaded by hub id.
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
    files: list[Path] = field(default_factory=list)
    revision: str | None = None
    #: files saved beside the weights so other libraries load the output the way they loaded the
    #: source (a sentence-transformers model's modules.json and pooling config), output name -> source
    companions: dict[str, Path] = field(default_factory=dict)

    @property
    def max_length(self) -> int | None:
        cfg = getattr(self.module, "config", None)
        return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


#: Model types that are encoders even though transformers also maps them to a causal-LM head class.
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "electra", "deberta", "deberta-v2", "distilbert", "mpnet", "camembert")


#: sentence-transformers' own files at the top of a model folder.
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def companion_files(folder: Path) -> dict[str, Path]:
    """A sentence-transformers folder's module files (modules.json, its config, each module's folder
    other than the transformer's own weights), relative name -> path; empty for other folders."""
    modules = folder / "modules.json"
    if not modules.is_file():
        return {}
    out = {name: folder / name for name in ST_FILES if (folder / name).is_file()}
    try:
        entries = json.loads(modules.read_text())
    except (OSError, ValueError):
        return {}
    for e in entries if isinstance(entries, list) else []:
        sub = folder / str(e.get("path", ""))
        if e.get("path") and sub.is_dir():
            out.update({p.relative_to(folder).as_posix(): p for p in sorted(sub.rglob("*")) if p.is_file()})
    return out


class _NamedClass:
    """The exact class a config's ``architectures`` names, with the two constructors of the Auto classes."""

    def __init__(self, cls: Any) -> None:
        self.cls = cls

    def from_pretrained(self, *args: Any, **kw: Any) -> Any:
        return self.cls.from_pretrained(*args, **kw)

    def from_config(self, config: Any, **kw: Any) -> Any:
        kw.pop("trust_remote_code", None)  # (a transformers class is not remote code)
        return self.cls._from_config(config, **kw)


def hf_auto_class(config: Any) -> Any:
    """AutoModelForCausalLM for decoders; the class ``architectures`` names for other models that
    transformers ships (a masked-LM or classification head is kept, not dropped by AutoModel);
    AutoModel otherwise. A config with no ``architectures`` (one converted from GGUF) is a decoder
    when transformers has a causal-LM class for its model type."""
    import transformers

    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        return transformers.AutoModelForCausalLM
    if len(archs) == 1 and isinstance(getattr(transformers, archs[0], None), type) and not getattr(
            config, "is_decoder", False):
        return _NamedClass(getattr(transformers, archs[0]))
    if getattr(config, "is_decoder", False):
        return transformers.AutoModelForCausalLM
    if not archs and config.model_type not in ENCODER_TYPES and not getattr(config, "is_encoder_decoder", False):
        try:
            transformers.AutoModelForCausalLM._model_mapping[type(config)]
            return transformers.AutoModelForCausalLM
        except KeyError:
            pass
    return transformers.AutoModel


def model_files(folder: Path) -> list[Path]:
    """The files of a local model folder that define it (weights, configs, tokenizer), sorted."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def try_tokenizer(where: str, **kw: Any) -> TextTokenizer | None:
    import transformers

    try:
        return HFTokenizer(transformers.AutoTokenizer.from_pretrained(where, **kw))
    except (OSError, ValueError, TypeError):
        return None


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelpressError(f"cannot read {path}: {e}") from e
