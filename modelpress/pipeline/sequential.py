"""The sequential calibration engine: one decoder block at a time, errors propagated.

1. Run the calibration samples through the model up to the first block and keep that block's
   inputs (hidden states plus the keyword arguments the block receives: masks, rotary tables).
2. For each block: every calibrated stage processes it (collects statistics through forward
   hooks on the cached inputs, then quantises / prunes / rescales its layers); the block is then
   run again on its *compressed* weights to produce the next block's inputs, so later blocks
   calibrate against the errors they will see at inference.
3. After each block the engine checkpoints (the compressed block + the next inputs) so a killed
   run resumes where it stopped, bit-identically.

No FX tracing: block boundaries come from the ``ArchSpec``. Algorithms see one block and a
:class:`BlockInputs`; they never move devices.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import torch
import torch.nn as nn

from ..core.errors import ModelpressError
from ..models.archspec import blocks_path, get_blocks
from ..models.loading import LoadedModel
from ..quant.qlinear import cached_dequant
from .methods import RunContext


class _Stop(Exception):
    """Raised by the capture hook to stop the forward pass at the first block."""


@dataclass
class BlockInputs:
    """Cached inputs of the current block: ``hidden`` (n_samples, seq, d) and shared kwargs.

    ``hidden`` may be a memory-mapped tensor (offload to disk) so its pages can leave RAM.
    """

    hidden: torch.Tensor  # (n_samples, seq, hidden)
    kwargs: dict[str, Any]
    batch_size: int = 1  # samples per block forward; kwargs (masks, rotary tables) broadcast over it
    on_disk: bool = False  # hidden is a memory-mapped file: keep other activation copies out of RAM too

    def batches(self) -> Iterator[torch.Tensor]:
        for s in range(0, self.hidden.shape[0], self.batch_size):
            yield self.hidden[s:s + self.batch_size]

    def run(self, block: nn.Module, stop_after: nn.Module | None = None, max_batches: int | None = None,
            *, stop_before: nn.Module | None = None, record: nn.Module | None = None) -> "SubInputs | None":
        """Forward every cached sample through ``block`` (hooks observe; outputs dropped).

        ``stop_before`` ends each forward when that submodule is called (after the input-capture
        pre-hooks registered earlier have seen its input); ``stop_after`` once it has run.
        ``max_batches`` limits the run to the first batches (a sample is enough for some searches).
        ``record`` keeps the inputs of that submodule, batch by batch, so a later observation
        that only needs its inside can replay it (:class:`SubInputs`) instead of the whole block;
        returns ``None`` when the forward stopped before reaching it.
        """
        handles = []
        calls: list[tuple[tuple, dict]] = []
        if record is not None:
            handles.append(record.register_forward_pre_hook(
                lambda _m, a, kw: calls.append((tuple(t.detach() if torch.is_tensor(t) else t for t in a),
                                                dict(kw))), with_kwargs=True))
        if stop_before is not None:
            handles.append(stop_before.register_forward_pre_hook(_raise_stop))
        if stop_after is not None:
            handles.append(stop_after.register_forward_hook(_raise_stop))
        n_batches = 0
        try:
            for b, x in enumerate(self.batches()):
                if max_batches is not None and b >= max_batches:
                    break
                n_batches += 1
                try:
                    block(x, **self.kwargs)
                except _Stop:
                    pass
        finally:
            for h in handles:
                h.remove()
        return SubInputs(calls) if record is not None and len(calls) == n_batches else None

    def propagate(self, block: nn.Module) -> None:
        """Replace the cached inputs by ``block``'s outputs (inputs of the next block)."""
        for s in range(0, self.hidden.shape[0], self.batch_size):
            out = block(self.hidden[s:s + self.batch_size], **self.kwargs)
            self.hidden[s:s + self.batch_size] = out[0] if isinstance(out, tuple) else out


@dataclass
class SubInputs:
    """Recorded inputs of one submodule of a block (e.g. the MLP), one call per cached batch.

    Replaying the submodule from these is exact as long as nothing *outside* it changed since
    they were recorded; the engine's callers only record a submodule that contains every layer
    they modify in between.
    """

    calls: list[tuple[tuple, dict]]

    def run(self, module: nn.Module, *, stop_before: nn.Module | None = None) -> None:
        """Call ``module`` on every recorded input (hooks observe; outputs dropped)."""
        handle = stop_before.register_forward_pre_hook(_raise_stop) if stop_before is not None else None
        try:
            for args, kwargs in self.calls:
                try:
                    module(*args, **kwargs)
                except _Stop:
                    pass
        finally:
            if handle is not None:
                handle.remove()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for a, _ in self.calls for t in a if torch.is_tensor(t))


def _raise_stop(*_: Any) -> None:
    raise _Stop


def common_ancestor(block: nn.Module, modules: Iterable[nn.Module]) -> nn.Module | None:
    """The deepest submodule of ``block`` (not ``block`` itself) that contains every one of ``modules``."""
    wanted = {id(m) for m in modules}
    best, best_depth = None, -1
    for name, m in block.named_modules():
        if not name:
            continue
        inside = {id(x) for x in m.modules()}
        depth = name.count(".")
        if wanted <= inside and depth > best_depth:
            best, best_depth = m, depth
    return best


def last_module(block: nn.Module, modules: Iterable[nn.Module]) -> nn.Module | None:
    """The one of ``modules`` registered last in ``block``: a forward can stop once it has run."""
    wanted = {id(m) for m in modules}
    last = None
    for m in block.modules():
        if id(m) in wanted:
            last = m
    return last


class BlockStage(Protocol):
    """A calibrated stage: compresses one block given its cached inputs."""

    def process_block(self, lm: LoadedModel, index: int, block: nn.Module, prefix: str,
                      inputs: BlockInputs, ctx: RunContext) -> None: ...


@torch.no_grad()
def capture_first_block_inputs(lm: LoadedModel, calib: torch.Tensor, offload: str | None = None) -> BlockInputs:
    """Run calibration ids up to block 0 and cache what it receives."""
    blocks = get_blocks(lm.module, lm.spec) if lm.spec else []
    if not blocks:
        raise ModelpressError("sequential calibration needs a known architecture (decoder blocks); "
                              f"{type(lm.module).__name__} has none: use a layer-wise method")
    store: dict[str, Any] = {}

    def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.pop("hidden_states")
        kwargs = dict(kwargs)
        kwargs.pop("hidden_states", None)
        store.setdefault("kwargs", kwargs)
        if "hidden" not in store:  # (n_samples, seq, d), allocated once the shape is known
            store["hidden"] = _allocate((calib.shape[0], *x.shape[1:]), x.dtype, offload, x.device)
        store["hidden"][store.setdefault("n", 0)] = x[0].detach()
        store["n"] += 1
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    from ..core.progress import track

    try:
        device = next((p.device for p in lm.module.parameters() if not p.is_meta), torch.device("cpu"))
        for row in track(calib, "calibration inputs"):
            try:
                _call_model(lm.module, row[None].to(device))  # the ids go to the model, never the reverse
            except _Stop:
                pass
    finally:
        handle.remove()
    hidden = store["hidden"]
    kwargs = {k: v for k, v in store["kwargs"].items() if k not in ("past_key_value", "past_key_values", "use_cache")}
    batch = max(1, 4096 // hidden.shape[1])  # ~4k tokens per forward: fewer calls, bounded memory
    return BlockInputs(hidden, kwargs, batch_size=batch, on_disk=offload is not None)


def _call_model(model: nn.Module, ids: torch.Tensor) -> Any:
    try:
        return model(input_ids=ids, use_cache=False)
    except TypeError:
        return model(ids)


def _allocate(shape: tuple[int, ...], dtype: torch.dtype, path: str | None,
              device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """A tensor on ``device``, or (CPU only) backed by a memory-mapped file at ``path``."""
    if path is None or device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    n = 1
    for d in shape:
        n *= d
    return torch.from_file(path, shared=True, size=n, dtype=dtype).view(shape)


class Checkpointer:
    """Per-block checkpoints: the compressed blocks done so far and the next block's inputs.

    ``workdir`` is the run's own folder (:class:`~modelpress.pipeline.workdir.RunFolder`); the
    checkpointer only ever deletes its own files there. Files are written to a temporary name and
    renamed, so a kill mid-write leaves the previous checkpoint intact.
    """

    FILES = ("state.json", "state.tmp", "inputs.safetensors", "inputs.safetensors.tmp", "block*.safetensors",
             "block*.safetensors.tmp")

    def __init__(self, workdir: str | Path | None, signature: dict[str, Any]) -> None:
        self.dir = Path(workdir) if workdir else None
        self.signature = signature
        self.formats: dict[str, Any] = {}  # block index -> per-layer formats, as saved in state.json

    def _state_path(self) -> Path:
        return self.dir / "state.json"

    def resume_point(self) -> int:
        """Index of the first block still to do (0 when there is no usable checkpoint)."""
        if self.dir is None or not self._state_path().exists():
            return 0
        try:
            state = json.loads(self._state_path().read_text())
        except ValueError:
            state = {}
        if state.get("signature") != self.signature:
            self._remove_files()  # a different job (model, recipe, data or code): start afresh
            return 0
        return int(state["next_block"])

    def _remove_files(self) -> None:
        for pattern in self.FILES:
            for p in self.dir.glob(pattern):
                p.unlink()

    def save(self, next_block: int, lm: LoadedModel, prefix: str, inputs: BlockInputs, ctx: RunContext) -> None:
        if self.dir is None:
            return
        from ..core.outputs import save_safetensors as save_file
        from ..export.saving import layer_formats

        self.dir.mkdir(parents=True, exist_ok=True)
        blk = lm.module.get_submodule(f"{prefix}.{next_block - 1}")
        sd = {k: v.contiguous() for k, v in blk.state_dict().items()}
        save_file(sd, str(self.dir / f"block{next_block - 1}.safetensors.tmp"))
        os.replace(self.dir / f"block{next_block - 1}.safetensors.tmp", self.dir / f"block{next_block - 1}.safetensors")
        save_file({"hidden": inputs.hidden.contiguous()}, str(self.dir / "inputs.safetensors.tmp"))
        os.replace(self.dir / "inputs.safetensors.tmp", self.dir / "inputs.safetensors")
        self.formats[str(next_block - 1)] = layer_formats(blk)
        state = {"signature": self.signature, "next_block": next_block, "layers": [vars(r) for r in ctx.layers],
                 "warnings": ctx.warnings, "formats": self.formats}
        tmp = self._state_path().with_suffix(".tmp")
        tmp.write_text(json.dumps(state, default=str))
        os.replace(tmp, self._state_path())

    def block_formats(self, i: int) -> dict[str, Any]:
        """Per-layer formats (block-relative names) recorded for block ``i``."""
        return self.formats.get(str(i), {})

    def restore(self, upto: int, lm: LoadedModel, prefix: str, inputs: BlockInputs, ctx: RunContext) -> None:
        """Rebuild blocks [0, upto) from their checkpoints and load the cached inputs of block ``upto``."""
        from ..export.saving import _install_packed_layers, read_safetensors
        from .methods import LayerRecord

        state = json.loads(self._state_path().read_text())
        self.formats = state.get("formats", {})
        for i in range(upto):
            if lm.lazy is not None:  # low memory: leave done blocks on disk
                lm.lazy.offload(i, self.dir / f"block{i}.safetensors", state["formats"].get(str(i), {}))
                continue
            blk = lm.module.get_submodule(f"{prefix}.{i}")
            tensors = read_safetensors(self.dir / f"block{i}.safetensors")
            _install_packed_layers(blk, state["formats"].get(str(i), {}), tensors)
            blk.load_state_dict(tensors, strict=False)
        inputs.hidden.copy_(read_safetensors(self.dir / "inputs.safetensors")["hidden"])
        ctx.layers[:] = [LayerRecord(**{**r, "shape": tuple(r["shape"]) if r.get("shape") else None}) for r in state["layers"]]
        ctx.warnings[:] = state["warnings"]

    def finish(self) -> None:
        if self.dir is not None and self.dir.is_dir():
            self._remove_files()


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """sha256 over modelpress's own source files and the torch version.

    Part of the checkpoint signature: a block checkpointed by other code (an upgrade, a local
    edit) is redone rather than spliced into this run's result, which would mix two algorithms.
    """
    h = hashlib.sha256(torch.__version__.encode())
    root = Path(__file__).resolve().parents[1]
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's values (two calibration sets of one shape are different jobs)."""
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def run_sequential(lm: LoadedModel, stages: list[tuple[BlockStage, str]], ctx: RunContext,
                   *, offload: str | None = None, signature: dict[str, Any] | None = None,
                   before_block: Callable[[int], None] | None = None) -> None:
    """Run every stage on each block in turn (see module docstring)."""
    if ctx.calib is None:
        raise ModelpressError("calibrated methods need calibration data (--calib FILE)")
    prefix = blocks_path(lm.module, lm.spec) if lm.spec else None
    if offload is None and ctx.offload_activations:
        if ctx.workdir is None:
            raise ModelpressError("offloading activations needs a working folder (--workdir)")
        Path(ctx.workdir).mkdir(parents=True, exist_ok=True)
        offload = str(Path(ctx.workdir) / "activations.bin")
    inputs = capture_first_block_inputs(lm, ctx.calib, offload)
    blocks = get_blocks(lm.module, lm.spec)
    ck = Checkpointer(ctx.workdir, {**(signature or {}), "n_blocks": len(blocks), "calib_shape": list(ctx.calib.shape),
                                    "calib_sha256": tensor_digest(ctx.calib), "code": code_fingerprint()})
    start = ck.resume_point()
    if start:
        ck.restore(start, lm, prefix, inputs, ctx)
        ctx.warn(f"resumed from checkpoint after block {start - 1} in {ck.dir}")
    for i in ctx.iterate(list(range(start, len(blocks))), "blocks"):
        if before_block is not None:
            before_block(i)
        with cached_dequant():
            for stage, _name in stages:
                stage.process_block(lm, i, blocks[i], f"{prefix}.{i}", inputs, ctx)
            inputs.propagate(blocks[i])
        ck.save(i + 1, lm, prefix, inputs, ctx)
        if lm.lazy is not None and ck.dir is not None:  # low memory: the checkpoint holds the block now
            lm.lazy.offload(i, ck.dir / f"block{i}.safetensors", ck.block_formats(i))
    if lm.lazy is not None and ck.dir is not None:
        lm.lazy.workdir = ck.dir  # the saver streams the blocks from here, then removes it
    else:
        ck.finish()
