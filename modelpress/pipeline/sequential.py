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
from pathlib import Path
from typing import Any, Callable

import torch

from ..calib.blocks import BlockInputs, capture_first_block_inputs
from ..core.errors import ModelpressError
from ..core.layers import install_packed_layers, layer_formats, load_resized
from ..core.method import BlockStage, LayerRecord, RunContext
from ..core.outputs import save_safetensors, writing
from ..models.mapped import save_by_rows
from ..models.archspec import blocks_path, get_blocks
from ..models.loading import LoadedModel
from ..models.saved import read_safetensors
from ..quant.qlinear import cached_dequant


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

    def save(self, next_block: int, lm: LoadedModel, prefix: str, inputs: BlockInputs, ctx: RunContext,
             floats: BlockInputs | None = None) -> None:
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        blk = lm.module.get_submodule(f"{prefix}.{next_block - 1}")
        sd = {k: v.contiguous() for k, v in blk.state_dict().items()}
        save_safetensors(sd, str(self.dir / f"block{next_block - 1}.safetensors.tmp"))
        os.replace(self.dir / f"block{next_block - 1}.safetensors.tmp", self.dir / f"block{next_block - 1}.safetensors")
        streams = {"hidden": inputs} | ({"float_hidden": floats} if floats is not None else {})
        with writing(self.dir / "inputs.safetensors.tmp"):  # batch by batch: an on-disk cache stays on disk
            save_by_rows(self.dir / "inputs.safetensors.tmp", {k: v.hidden for k, v in streams.items()},
                         inputs.batch_size, lambda k, a, b: streams[k].release(a, b))
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

    def restore(self, upto: int, lm: LoadedModel, prefix: str, inputs: BlockInputs, ctx: RunContext,
                floats: BlockInputs | None = None, stages: tuple[Any, ...] = ()) -> None:
        """Rebuild blocks [0, upto) from their checkpoints and load the cached inputs of block ``upto``.

        A stage that changes more of a block than its tensors (sizes cached by its modules or the
        config) provides ``restore_block(lm, index, block)``, called on each rebuilt block."""
        state = json.loads(self._state_path().read_text())
        self.formats = state.get("formats", {})
        for i in range(upto):
            if lm.lazy is not None:  # low memory: leave done blocks on disk
                lm.lazy.offload(i, self.dir / f"block{i}.safetensors", state["formats"].get(str(i), {}))
                continue
            blk = lm.module.get_submodule(f"{prefix}.{i}")
            tensors = read_safetensors(self.dir / f"block{i}.safetensors")
            install_packed_layers(blk, state["formats"].get(str(i), {}), tensors)
            load_resized(blk, tensors)
            for stage in stages:
                if hasattr(stage, "restore_block"):
                    stage.restore_block(lm, i, blk)
        _read_streams(self.dir / "inputs.safetensors", {"hidden": inputs} | ({"float_hidden": floats} if floats is not None else {}))
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


def _read_streams(path: Path, streams: dict[str, BlockInputs]) -> None:
    """Load checkpointed activation streams into the caches batch by batch (never whole in RAM)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as h:
            for name, s in streams.items():
                part = h.get_slice(name)
                for a in range(0, s.hidden.shape[0], s.batch_size):
                    s.hidden[a:a + s.batch_size] = part[a:a + s.batch_size]
                    s.release(a, a + s.batch_size)
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise ModelpressError(f"cannot read {path}: {str(e).splitlines()[0]}") from None


def run_sequential(lm: LoadedModel, stages: list[tuple[BlockStage, str] | tuple[Any, str, bool]], ctx: RunContext,
                   *, offload: str | None = None, signature: dict[str, Any] | None = None,
                   before_block: Callable[[int], None] | None = None, checkpoints: bool = True,
                   reference: Any = None, float_inputs: BlockInputs | None = None) -> None:
    """Run every stage on each block in turn (see module docstring).

    ``stages``: (stage, name) or (stage, name, wants_targets). A stage that wants targets (block
    reconstruction) also receives the float reference block's outputs for the same tokens, computed
    on the float stream (``float_inputs``, captured before any stage changed the model), which the
    pass propagates through the reference's float blocks beside the compressed stream.
    """
    if ctx.calib is None:
        raise ModelpressError("calibrated methods need calibration data (--calib FILE)")
    stages3 = [(s[0], s[1], bool(s[2]) if len(s) > 2 else False) for s in stages]
    wants_targets = any(t for _, _, t in stages3)
    if wants_targets and (reference is None or float_inputs is None):
        raise ModelpressError(f"stage {next(n for _, n, t in stages3 if t)!r} needs the float reference and calibration data")
    prefix = blocks_path(lm.module, lm.spec) if lm.spec else None
    if offload is None and ctx.offload_activations:
        if ctx.workdir is None:
            raise ModelpressError("offloading activations needs a working folder (--workdir)")
        Path(ctx.workdir).mkdir(parents=True, exist_ok=True)
        offload = str(Path(ctx.workdir) / "activations.bin")
    inputs = capture_first_block_inputs(lm, ctx.calib, offload)
    inputs.precision = ctx.matmul_precision
    blocks = get_blocks(lm.module, lm.spec)
    ck = Checkpointer(ctx.workdir if checkpoints else None,
                      {**(signature or {}), "n_blocks": len(blocks), "calib_shape": list(ctx.calib.shape),
                       "matmul_precision": ctx.matmul_precision,
                       "calib_sha256": tensor_digest(ctx.calib), "code": code_fingerprint()})
    floats = float_inputs if wants_targets else None
    start = ck.resume_point()
    if start:
        ck.restore(start, lm, prefix, inputs, ctx, floats, tuple(s for s, _, _ in stages3))
        ctx.warn(f"resumed from checkpoint after block {start - 1} in {ck.dir}")
    for i in ctx.iterate(list(range(start, len(blocks))), "blocks"):
        if before_block is not None:
            before_block(i)
        targets = floats.outputs(reference.block(i)) if floats is not None else None  # (n, seq, hidden)
        ctx.float_inputs = floats  # the float stream into block i (moved on below, after the stages)
        with cached_dequant():
            for stage, _name, want in stages3:
                inputs.forget_known()  # outputs a stage kept stay valid only until another stage runs
                if want:
                    stage.process_block(lm, i, blocks[i], f"{prefix}.{i}", inputs, ctx, targets)
                else:
                    stage.process_block(lm, i, blocks[i], f"{prefix}.{i}", inputs, ctx)
            inputs.propagate(blocks[i])
        if floats is not None:
            floats.hidden.copy_(targets)  # the float stream moves on through the float block
        ctx.float_inputs = None
        ck.save(i + 1, lm, prefix, inputs, ctx, floats)
        if lm.lazy is not None and ck.dir is not None:  # low memory: the checkpoint holds the block now
            lm.lazy.offload(i, ck.dir / f"block{i}.safetensors", ck.block_formats(i))
    if lm.lazy is not None and ck.dir is not None:
        lm.lazy.workdir = ck.dir  # the saver streams the blocks from here, then removes it
    else:
        ck.finish()


def run_without_inputs(lm: LoadedModel, stages: list[tuple[Any, str, bool]], ctx: RunContext,
                       *, before_block: Callable[[int], None] | None = None) -> None:
    """Visit each block with stages that need no calibration data (``inputs`` is None)."""
    prefix = blocks_path(lm.module, lm.spec) if lm.spec else None
    blocks = get_blocks(lm.module, lm.spec) if lm.spec else []
    for i in ctx.iterate(list(range(len(blocks))), "blocks"):
        if before_block is not None:
            before_block(i)
        for stage, _name, _ in stages:
            stage.process_block(lm, i, blocks[i], f"{prefix}.{i}", None, ctx)
