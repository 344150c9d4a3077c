"""The frozen float reference: the original model, for stages that compare against it after earlier
stages changed the model in place.

It never holds a second full copy in RAM. Its tensors are read on demand, one block at a time,
through memory-mapped safetensors: straight from the source files when the model was loaded from
a safetensors folder whose tensors match the model's (and always in low-memory mode, which reads
its blocks that way already), otherwise from a snapshot written to the run's folder before the
first stage runs. Its modules are rebuilt from skeletons (the original classes on the meta
device), so a block pruned to a smaller shape or quantised in the model is still the float block
here.

Example:
    >>> ref = FloatReference.snapshot(lm, folder)   # before any stage          # doctest: +SKIP
    >>> block = ref.block(3)                          # float block 3, fresh     # doctest: +SKIP
    >>> logits = ref.model()(input_ids=ids).logits    # blocks stream from disk  # doctest: +SKIP
"""
from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..core.errors import ModelpressError
from ..core.outputs import save_safetensors
from ..models.archspec import blocks_path, get_blocks
from ..models.lazy import read_keys, shard_index
from ..models.loading import LoadedModel


def _meta_copy(module: nn.Module) -> nn.Module:
    """The module's structure with every tensor on the meta device (no data is copied)."""
    memo: dict[int, Any] = {id(p): nn.Parameter(p.detach().to("meta"), requires_grad=False) for p in module.parameters()}
    memo.update({id(b): b.detach().to("meta") for b in module.buffers()})
    skeleton = copy.deepcopy(module, memo)
    for m in skeleton.modules():  # hooks are the caller's, on its model; a float copy must not fire them
        for attr in _HOOK_DICTS:
            d = getattr(m, attr, None)
            if isinstance(d, dict):
                d.clear()
    return skeleton


#: ``nn.Module`` attributes holding per-instance forward/backward hooks (deepcopy copies them with the
#: module); state-dict hooks stay, loading may rely on them.
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_hooks", "_backward_pre_hooks")


def _non_persistent(module: nn.Module) -> dict[str, torch.Tensor]:
    """Buffers no file holds (rotary tables): kept in RAM, they are small."""
    out = {}
    for name, m in module.named_modules():
        for leaf in getattr(m, "_non_persistent_buffers_set", ()):
            buf = getattr(m, leaf, None)
            if isinstance(buf, torch.Tensor) and not buf.is_meta:
                out[f"{name}.{leaf}" if name else leaf] = buf.detach().clone()
    return out


class FloatReference:
    """Read-only float copy of a model's tensors, materialised one block at a time."""

    def __init__(self, lm: LoadedModel, key_to_file: dict[str, Path], owned: Path | None = None) -> None:
        self.prefix = blocks_path(lm.module, lm.spec)
        self.key_to_file = key_to_file
        self.owned = owned  # a snapshot folder the reference made (removed by ``close``)
        self._skeleton = _meta_copy(lm.module)  # structure of the original model, no data
        self._extra = _non_persistent(lm.module)
        self.n_blocks = len(get_blocks(lm.module, lm.spec))

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def snapshot(cls, lm: LoadedModel, folder: str | Path | None) -> "FloatReference":
        """A reference to ``lm`` as it is now: its source files when they hold exactly these
        tensors, else a snapshot written into ``folder`` (a temporary folder when None)."""
        if lm.spec is None or not get_blocks(lm.module, lm.spec):
            raise ModelpressError("the float reference needs a known decoder architecture (blocks)")
        source = _matching_source(lm)
        if source is not None:
            return cls(lm, source)
        target = Path(folder) / "reference" if folder is not None else Path(tempfile.mkdtemp(prefix="modelpress-ref-"))
        target.mkdir(parents=True, exist_ok=True)
        return cls(lm, _write_snapshot(lm, target), owned=target)

    def close(self) -> None:
        """Remove the snapshot this reference wrote (source files are never touched)."""
        if self.owned is not None and self.owned.exists():
            shutil.rmtree(self.owned, ignore_errors=True)
        self.owned = None

    # ---- reading -----------------------------------------------------------------------------
    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Original tensors whose names start with ``prefix`` (prefix stripped), memory-mapped."""
        return read_keys(self.key_to_file, prefix)

    def block(self, i: int) -> nn.Module:
        """A fresh float copy of block ``i`` as it was before any stage (the caller owns it)."""
        skel = self._skeleton.get_submodule(f"{self.prefix}.{i}")
        blk = copy.deepcopy(skel).to_empty(device="cpu")
        state = self.tensors(f"{self.prefix}.{i}.")
        missing, unexpected = blk.load_state_dict(state, strict=False)
        missing = [k for k in missing if k in dict(blk.named_parameters())]
        if missing or unexpected:
            raise ModelpressError(f"float reference block {i}: missing {missing[:3]}, unexpected {unexpected[:3]}")
        self._restore(blk, f"{self.prefix}.{i}.")
        return blk.eval().requires_grad_(False)

    def model(self) -> nn.Module:
        """The whole float model, whose blocks load from disk for each forward and are freed after
        (for teacher forwards in training stages: one float block in RAM at a time)."""
        model = copy.deepcopy(self._skeleton).to_empty(device="cpu")
        rest = read_keys(self.key_to_file, "", exclude=self.prefix + ".")
        model.load_state_dict(rest, strict=False)
        self._restore(model, "")
        if getattr(getattr(model, "config", None), "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
            model.tie_weights()
        blocks = model.get_submodule(self.prefix)
        for i in range(len(blocks)):
            blocks[i] = _StreamedBlock(self, i, blocks[i])
        return model.eval().requires_grad_(False)


    def _restore(self, module: nn.Module, prefix: str) -> None:
        """Put back the non-persistent buffers under ``prefix`` (names relative to ``module``)."""
        for name, buf in self._extra.items():
            if name.startswith(prefix):
                owner, _, leaf = name[len(prefix):].rpartition(".")
                setattr(module.get_submodule(owner) if owner else module, leaf, buf.clone())


class _StreamedBlock(nn.Module):
    """A block that materialises its float weights for one forward and drops them after."""

    def __init__(self, ref: FloatReference, index: int, original: nn.Module) -> None:
        super().__init__()
        self._ref, self.index = ref, index
        for k, v in vars(original).items():  # attributes model code reads off blocks (attention_type ...)
            if not k.startswith("_") and not isinstance(v, (nn.Module, torch.Tensor)) and k != "training":
                setattr(self, k, v)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._ref.block(self.index)(*args, **kwargs)


def _matching_source(lm: LoadedModel) -> dict[str, Path] | None:
    """name -> source safetensors file, when the files hold exactly the model's float tensors."""
    if lm.lazy is not None:
        if lm.lazy.key_to_file is None:
            raise ModelpressError("the float reference of a --low-memory run reads safetensors sources; this model "
                                  "was loaded from a GGUF: convert it to a safetensors folder first")
        return lm.lazy.key_to_file
    folder = Path(lm.source)
    if lm.kind != "hf" or not folder.is_dir() or not any(folder.glob("*.safetensors")):
        return None
    try:
        keys = shard_index(folder)
    except ModelpressError:
        return None
    from safetensors import safe_open

    shapes = {}
    for f in set(keys.values()):
        with safe_open(str(f), "pt") as h:
            shapes.update({k: tuple(h.get_slice(k).get_shape()) for k in h.keys()})
    want = {k: tuple(v.shape) for k, v in lm.module.state_dict().items()}
    params = {k for k, _ in lm.module.named_parameters(remove_duplicate=False)}
    ok = all(shapes.get(k) == s for k, s in want.items() if k in params and k in shapes) and \
        all(k in shapes for k in params if not _tied(lm, k))
    return keys if ok else None


def _tied(lm: LoadedModel, key: str) -> bool:
    """The head's weight when the config ties it to the embedding (stored once, under the embedding)."""
    return key.endswith("lm_head.weight") and bool(getattr(getattr(lm.module, "config", None), "tie_word_embeddings", False))


def _write_snapshot(lm: LoadedModel, folder: Path) -> dict[str, Path]:
    """One safetensors file per block plus one for the rest; returns name -> file."""
    prefix = blocks_path(lm.module, lm.spec)
    key_to_file: dict[str, Path] = {}
    sd = lm.module.state_dict()
    groups: dict[str, dict[str, torch.Tensor]] = {}
    seen: dict[int, str] = {}
    for k, v in sd.items():
        if v.is_meta:
            raise ModelpressError("the float reference of a low-memory model is read from its source files")
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen and v.numel():  # a tied tensor: stored once (safetensors refuses aliases)
            continue
        seen[ptr] = k
        rel = k[len(prefix) + 1:] if k.startswith(prefix + ".") else None
        name = f"block{rel.split('.', 1)[0]}" if rel is not None else "rest"
        groups.setdefault(name, {})[k] = v.detach().contiguous().clone()
    for name, tensors in groups.items():
        path = folder / f"{name}.safetensors"
        save_safetensors(tensors, path)
        key_to_file.update({k: path for k in tensors})
    return key_to_file
