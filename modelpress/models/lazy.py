"""Low-memory loading: decoder blocks stay on the meta device until the engine needs them.

The model is built with its real non-block parts (embeddings, final norm, head, rotary tables) and
a list of empty blocks; :meth:`LazyBlocks.ensure` reads one block's tensors from the memory-mapped
safetensors files when the sequential engine reaches it. Peak memory is then one float block plus
whatever was already compressed, not the whole float model. The parts outside the blocks are
mapped from the files (:mod:`.mapped`), so an embedding table costs RAM only for the rows read.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from ..core.errors import ModelpressError
from .archspec import blocks_path, detect_spec
from .loading import LoadedModel, hf_auto_class, model_files, try_tokenizer


class LazyBlocks:
    """Reads block ``i``'s tensors from safetensors shards on demand."""

    def __init__(self, model: nn.Module, prefix: str, key_to_file: dict[str, Path] | None,
                 read_block: Callable[[int], dict[str, torch.Tensor]] | None = None) -> None:
        self.model = model
        self.prefix = prefix
        #: safetensors sources (None for a GGUF: its tensors are quantised, so no float reference reads them)
        self.key_to_file = key_to_file
        self._read_block = read_block or (lambda i: read_keys(self.key_to_file, f"{self.prefix}.{i}."))
        self.loaded: set[int] = set()
        #: compressed blocks moved out of RAM: index -> (safetensors file, per-layer formats)
        self.offloaded: dict[int, tuple[Path, dict[str, Any]]] = {}
        self.workdir: Path | None = None  # the checkpoint folder the offloaded blocks live in
        self.run_folder: Any = None  # its pipeline.workdir.RunFolder, closed once the model has been saved

    def ensure(self, i: int) -> nn.Module:
        """Materialise block ``i`` on CPU from disk (no-op when already loaded)."""
        block = self.model.get_submodule(f"{self.prefix}.{i}")
        if i in self.offloaded:
            raise ModelpressError(f"block {i} is already compressed and offloaded to {self.offloaded[i][0]}; "
                                  "save the model and reload it to use it")
        if i in self.loaded:
            return block
        sd = self._read_block(i)
        block.to_empty(device="cpu")
        missing, unexpected = block.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ModelpressError(f"block {i}: checkpoint lacks {missing[:3]} / has extra {unexpected[:3]}")
        for name, t in sd.items():  # the whole model is never in RAM at once: check each block as it arrives
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ModelpressError(f"tensor {self.prefix}.{i}.{name} holds NaN/Inf values; refusing to use it")
        self.loaded.add(i)
        return block

    def offload(self, i: int, path: Path, formats: dict[str, Any]) -> None:
        """Drop block ``i`` from RAM: its compressed tensors live in ``path`` until saving."""
        self.model.get_submodule(f"{self.prefix}.{i}").to("meta")
        self.offloaded[i] = (Path(path), formats)
        self.loaded.add(i)
        release_freed_memory()

    def ensure_all(self) -> None:
        for i in range(len(self.model.get_submodule(self.prefix))):
            self.ensure(i)


def release_freed_memory() -> None:
    """Hand memory freed by the last block back to the OS (glibc keeps it in its arenas otherwise).

    Without this the process's RSS stays at its high-water mark even though the float block and
    the GPTQ temporaries are gone, which is what a memory limit (or a user watching ``top``) sees.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc: nothing to do
            pass


def shard_index(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from ``model.safetensors.index.json`` or the single file."""
    idx = folder / "model.safetensors.index.json"
    if idx.exists():
        wm = json.loads(idx.read_text())["weight_map"]
        return {k: folder / v for k, v in wm.items()}
    single = folder / "model.safetensors"
    if not single.exists():
        raise ModelpressError(f"{folder}: low-memory loading needs safetensors weights")
    from safetensors import safe_open

    with safe_open(str(single), "pt") as f:
        return {k: single for k in f.keys()}


def read_keys(key_to_file: dict[str, Path], prefix: str, exclude: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors whose name starts with ``prefix`` and not ``exclude`` (prefix stripped), read through mmap.

    Only the wanted tensors are touched, so reading the non-block parts never pages in the blocks.
    """
    from safetensors import safe_open

    out = {}
    for f, keys in _by_file(key_to_file, prefix, exclude).items():
        with safe_open(str(f), "pt") as h:
            for k in keys:
                out[k[len(prefix):]] = h.get_tensor(k)
    return out


def map_keys(key_to_file: dict[str, Path], prefix: str, exclude: str | None = None) -> dict[str, torch.Tensor]:
    """As :func:`read_keys`, but the tensors stay in the files' pages (see :mod:`.mapped`).

    For the parts outside the blocks (embeddings, head, final norm): the embedding table is the
    largest tensor of a small model and a calibration run reads only its rows for the tokens seen.
    """
    from .mapped import map_tensors

    out = {}
    for f, names in _by_file(key_to_file, prefix, exclude).items():
        out.update({k[len(prefix):]: t for k, t in map_tensors(f, names).items()})
    return out


def _by_file(key_to_file: dict[str, Path], prefix: str, exclude: str | None) -> dict[Path, list[str]]:
    """The names starting with ``prefix`` and not ``exclude``, grouped by the file holding them."""
    by_file: dict[Path, list[str]] = {}
    for k, f in key_to_file.items():
        if k.startswith(prefix) and not (exclude and k.startswith(exclude)):
            by_file.setdefault(f, []).append(k)
    return by_file


def load_lazy(folder: str | Path, *, trust_remote_code: bool = False) -> LoadedModel:
    """A model whose blocks load on demand (see module docstring); blocks must be homogeneous."""
    import transformers

    folder = Path(folder)
    config = transformers.AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    model, spec, prefix = _skeleton(config, folder, trust_remote_code=trust_remote_code)
    keys = shard_index(folder)
    rest = map_keys(keys, "", exclude=prefix + ".")
    missing, unexpected = model.load_state_dict(rest, strict=False, assign=True)
    if unexpected:
        raise ModelpressError(f"{folder}: unexpected tensors {unexpected[:3]}")
    tied = getattr(config, "tie_word_embeddings", False)
    if tied:
        model.tie_weights()
    absent = [k for k in missing if not k.startswith(prefix + ".") and not (tied and _is_tied_head(model, k))]
    if absent:  # nothing was initialised: a tensor the files lack would hold garbage
        raise ModelpressError(f"{folder}: the checkpoint lacks {absent[:3]}")
    model.eval()
    lm = LoadedModel(model, spec, try_tokenizer(str(folder)), str(folder), "hf", files=model_files(folder))
    lm.lazy = LazyBlocks(model, prefix, keys)  # type: ignore[attr-defined]
    return lm


def load_lazy_gguf(path: str | Path) -> LoadedModel:
    """A plain-architecture GGUF (llama, qwen2, qwen3) whose blocks are dequantised on demand.

    The non-block tensors (embeddings, final norm, head) are dequantised at load; block ``i``'s
    when the engine reaches it, straight from the memory-mapped file.
    """
    import numpy as np

    from .loaded import HFTokenizer
    from .loading import gguf_tensors, plain_gguf

    path = Path(path)
    plain = plain_gguf(path)
    if plain is None:
        raise ModelpressError(f"{path}: --low-memory reads GGUF files of a plain architecture (llama, qwen2, "
                              "qwen3) only; convert it to safetensors first")
    from transformers.integrations.gguf import GgufHeader

    cfg, config, tok_class = plain
    model, spec, prefix = _skeleton(config, path)
    model.tie_weights()
    header = GgufHeader.from_file(str(path))
    from .loading import _fill_from_gguf

    _fill_from_gguf(model, header, cfg, wanted=lambda n: not n.startswith(prefix + "."))
    model.eval()

    def read_block(i: int) -> dict[str, torch.Tensor]:
        head = f"{prefix}.{i}."
        # (a float32 tensor's values may be a read-only view of the mapped file: copied then)
        return {n[len(head):]: torch.from_numpy(np.require(w, np.float32, ["C", "W"]))
                for n, w in gguf_tensors(model, header, cfg, lambda n: n.startswith(head))}

    tok = HFTokenizer(tok_class.from_pretrained(str(path.parent), gguf_file=path.name))
    lm = LoadedModel(model, spec, tok, str(path), "gguf", files=[path])
    lm.lazy = LazyBlocks(model, prefix, None, read_block)  # type: ignore[attr-defined]
    return lm


def _skeleton(config: Any, source: Path, **kw: Any) -> tuple[nn.Module, Any, str]:
    """(model, spec, block prefix): the model built with one uninitialised block, then
    ``num_hidden_layers`` empty (meta) blocks in its place; every tensor comes from the files later."""
    n_layers = config.num_hidden_layers
    small = config.__class__.from_dict({**config.to_dict(), "num_hidden_layers": 1})
    with _no_init_weights():  # random init would only touch pages the files overwrite
        model = hf_auto_class(config).from_config(small, **kw)
    spec = detect_spec(model)
    prefix = blocks_path(model, spec) if spec else None
    if prefix is None:
        raise ModelpressError(f"{source}: low-memory loading needs a known architecture")
    _meta_blocks(model, prefix, n_layers)
    model.config.num_hidden_layers = n_layers
    return model, spec, prefix


def _no_init_weights() -> Any:
    """transformers' context that skips weight initialisation (its module moved in v5)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def _is_tied_head(model: nn.Module, key: str) -> bool:
    """``key`` names the output head's weight and it is the input embedding's tensor now."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and emb is not None and key.endswith("weight") and head.weight is emb.weight \
        and key.rsplit(".", 1)[0] in {n for n, m in model.named_modules() if m is head}


def _meta_blocks(model: nn.Module, prefix: str, n: int) -> None:
    """Replace the one real block by ``n`` empty (meta) blocks of the same class."""
    blocks = model.get_submodule(prefix)
    first = blocks[0]
    cls, cfg = type(first), model.config
    with torch.device("meta"):
        new = nn.ModuleList([_make_block(cls, cfg, i) for i in range(n)])
    parent, _, name = prefix.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


def _make_block(cls: type, cfg: Any, i: int) -> nn.Module:
    try:
        return cls(cfg, layer_idx=i)
    except TypeError:
        return cls(cfg)
