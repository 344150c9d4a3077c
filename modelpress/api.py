"""The Python API; the CLI is a thin layer over these functions.

Example:
    >>> import modelpress as mp
    >>> lm = mp.load("bundled:smollm2-135m-instruct")                 # doctest: +SKIP
    >>> report = mp.compress(lm, "rtn-w4-g64")                         # doctest: +SKIP
    >>> mp.evaluate(lm, "wiki.test.raw", join_lines=True, max_tokens=8192)  # doctest: +SKIP
    >>> mp.save(lm, "out/smollm2-w4", recipe="rtn-w4-g64")             # doctest: +SKIP
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .calib.data import Calibration
from .core.errors import ModelpressError
from .core.progress import track
from .data.sources import DEFAULT_CALIBRATION, DEFAULT_EVALUATION, read_text
from .eval.perplexity import perplexity
from .eval.size import count_params, disk_bytes, memory_bytes, peak_rss_bytes
from .models.loading import LoadedModel, load_model
from .core.method import METHODS, MethodConfig, RunContext
from .pipeline.recipe import Recipe, load_recipe
from .pipeline.workdir import RunFolder


def load(model: str | Path | nn.Module | LoadedModel, *, low_memory: bool = False, **kw: Any) -> LoadedModel:
    """Load a model (hub id, folder, .gguf, llama2.c .bin, modelpress output, or nn.Module).

    ``low_memory`` (a local safetensors folder): decoder blocks are read from disk only when the
    sequential engine reaches them, so models larger than RAM can be compressed.
    """
    if isinstance(model, LoadedModel):
        return model
    if low_memory:
        from .models.lazy import load_lazy

        if not Path(str(model)).is_dir():
            raise ModelpressError("--low-memory needs a local folder of safetensors weights")
        return load_lazy(model, trust_remote_code=kw.get("trust_remote_code", False))
    return load_model(model, **kw)


def as_recipe(recipe: str | Path | Recipe | MethodConfig | dict) -> Recipe:
    """A Recipe from a built-in name, YAML path, dict, Recipe or a single method config."""
    if isinstance(recipe, MethodConfig):
        return Recipe(name=f"single-{recipe.method}", stages=[recipe])
    return load_recipe(recipe)


def calibration_for(lm: LoadedModel, calib: str | Path | torch.Tensor | Calibration | None = DEFAULT_CALIBRATION,
                    n_samples: int = 128, seq_len: int = 2048, seed: int = 0, chat: bool = False) -> Calibration | None:
    """Calibration token ids and their provenance from a file / dataset / bundled text spec.

    A ready (N, L) tensor is wrapped as it is. The default is the C4 excerpt shipped with
    modelpress (``bundled:c4``).
    """
    if calib is None or isinstance(calib, Calibration):
        return calib
    if isinstance(calib, torch.Tensor):
        return Calibration.from_ids(calib)
    from .calib.data import calibration_tokens, tokens_sha256
    from .data.sources import describe_source

    seq_len = min(seq_len, lm.max_length or seq_len)
    ids = calibration_tokens(lm.tokenizer, calib, n_samples, seq_len, seed,
                             bos_token_id=lm.tokenizer.bos_token_id if lm.add_bos and lm.tokenizer else None, chat=chat)
    info = describe_source(calib) | {"samples": n_samples, "seq_len": seq_len, "seed": seed, "chat": chat,
                                     "tokens_sha256": tokens_sha256(ids)}
    return Calibration(ids, info)


def needs_calibration(recipe: str | Path | Recipe | MethodConfig | dict) -> bool:
    """Whether any stage of ``recipe`` needs calibration data."""
    return any(METHODS.get(st.method).needs_calibration for st in as_recipe(recipe).stages)


def apply(lm: LoadedModel, recipe: str | Path | Recipe | MethodConfig | dict, *,
          calib: torch.Tensor | Calibration | None = None, progress: bool = True, workdir: str | Path | None = None,
          offload_activations: bool = False, remove_workdir_if_empty: bool = False) -> RunContext:
    """Apply every stage of ``recipe`` to ``lm`` in place; returns the filled run context.

    ``workdir`` enables per-block checkpoints (a rerun resumes): the run works in its own
    subfolder there and removes only that (see :mod:`modelpress.pipeline.workdir`);
    ``offload_activations`` keeps the calibration activations in a memory-mapped file there.
    """
    rec = as_recipe(recipe)
    cal = calib if isinstance(calib, Calibration) or calib is None else Calibration.from_ids(calib)
    check_compressible(lm, rec)
    folder = RunFolder(workdir, remove_parent_if_empty=remove_workdir_if_empty) if workdir else None
    ctx = RunContext(calib=cal.ids if cal else None, progress=track if progress else None,
                     workdir=str(folder.open()) if folder else None, offload_activations=offload_activations)
    if folder is not None:
        from .models.fingerprint import source_digest

        ctx.source_id = source_digest(lm)  # by content: a replaced file at the same path is another job
    for group in _stage_groups(rec):
        entry = METHODS.get(group[0].method)
        if entry.needs_calibration and cal is None:
            raise ModelpressError(f"method {group[0].method!r} needs calibration data: pass --calib FILE")
        with torch.no_grad():
            if entry.block_stage is None:
                if lm.lazy is not None:
                    ctx.warn(f"{group[0].method} is not block-wise: all blocks were loaded into memory for it")
                    lm.lazy.ensure_all()
                entry.run(lm, group[0], ctx)
            else:
                _run_calibrated(lm, rec, group, ctx)
    if folder is not None:
        if lm.lazy is not None and lm.lazy.workdir is not None:
            lm.lazy.run_folder = folder  # the saver streams the offloaded blocks from it, then closes it
        else:
            folder.close()
    return ctx


def check_finite(lm: LoadedModel) -> None:
    """Refuse a model holding NaN/Inf anywhere (weights, norms, embeddings, scales), naming the tensor.

    One such value poisons every scale computed from it and every activation after it; the result
    would be reported as ``nan -> nan`` instead of failing.
    """
    seen: set[tuple[int, int]] = set()
    for name, t in lm.module.state_dict().items():
        if t.is_meta or not t.is_floating_point() or t.numel() == 0:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        bad = ~torch.isfinite(t)
        if bad.any():
            n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            raise ModelpressError(f"{lm.source}: tensor {name} holds {n_nan} NaN and {n_inf} Inf value(s); "
                                  "refusing to use a model with non-finite weights")


def check_compressible(lm: LoadedModel, rec: Recipe) -> None:
    """Refuse, before any work, a model that cannot be compressed as asked (non-finite values, an empty recipe)."""
    if not rec.stages:
        raise ModelpressError(f"recipe {rec.name!r} has no stages: nothing would be compressed")
    check_finite(lm)


def _stage_groups(rec: Recipe) -> list[list[MethodConfig]]:
    """Consecutive calibrated stages share one sequential pass (AWQ then GPTQ on each block)."""
    groups: list[list[MethodConfig]] = []
    for st in rec.stages:
        block = METHODS.get(st.method).block_stage is not None
        if block and groups and METHODS.get(groups[-1][0].method).block_stage is not None:
            groups[-1].append(st)
        else:
            groups.append([st])
    return groups


def _run_calibrated(lm: LoadedModel, rec: Recipe, group: list[MethodConfig], ctx: RunContext) -> None:
    from .pipeline.sequential import run_sequential

    stages = [(METHODS.get(st.method).block_stage(lm, st), st.method) for st in group]
    sig = {"source": ctx.source_id, "recipe": rec.to_dict(), "stages": [st.to_dict() for st in group]}
    before = lm.lazy.ensure if lm.lazy is not None else None
    run_sequential(lm, stages, ctx, signature=sig, before_block=before)


def compress(lm: LoadedModel, recipe: Any, *, calib: torch.Tensor | Calibration | None = None, progress: bool = True,
             workdir: str | Path | None = None, offload_activations: bool = False,
             remove_workdir_if_empty: bool = False) -> dict[str, Any]:
    """Apply ``recipe`` and return the report (per-layer formats and errors, timings, memory,
    and the calibration data's provenance)."""
    rec = as_recipe(recipe)
    cal = calib if isinstance(calib, Calibration) or calib is None else Calibration.from_ids(calib)
    t0, c0 = time.perf_counter(), time.process_time()
    ctx = apply(lm, rec, calib=cal, progress=progress, workdir=workdir, offload_activations=offload_activations,
                remove_workdir_if_empty=remove_workdir_if_empty)
    layers = [vars(r) for r in ctx.layers]
    bits = [r["bits_per_weight"] for r in layers if r.get("bits_per_weight")]
    return {
        "model": lm.source, "recipe": rec.to_dict(), "calibration": cal.info if cal else None,
        "layers": layers, "warnings": ctx.warnings,
        "compress_s": time.perf_counter() - t0, "n_quantized": len(bits),
        "compress_cpu_s": time.process_time() - c0,  # all threads; robust to a busy machine, unlike wall time
        "mean_bits_per_weight": sum(bits) / len(bits) if bits else None, "peak_rss_bytes": peak_rss_bytes(),
        "params": count_params(lm.module), "memory_bytes": memory_bytes(lm.module),
    }


def evaluate(lm: LoadedModel, data: str | Path = DEFAULT_EVALUATION, *, seq_len: int | None = None,
             max_tokens: int | None = None, stride: int | None = None, join_lines: bool | None = None,
             progress: bool = True, size_path: str | Path | None = None) -> dict[str, Any]:
    """Perplexity and size of ``lm`` on a text (GPTQ protocol; sliding window with ``stride``).

    ``data``: a file, ``hf:DATASET``, or ``bundled:NAME`` (default: the WikiText-2 test set shipped
    with modelpress). ``join_lines`` None uses the source's default (on for WikiText-2).
    """
    if lm.tokenizer is None:
        raise ModelpressError(f"model {lm.source} has no tokenizer; perplexity needs one")
    for name, v, low in (("seq_len", seq_len, 2), ("max_tokens", max_tokens, 1), ("stride", stride, 1)):
        if v is not None and v < low:
            raise ModelpressError(f"{name} must be >= {low}, got {v}")
    seq_len = seq_len or min(2048, lm.max_length or 2048)
    if lm.max_length and seq_len > lm.max_length:
        raise ModelpressError(f"--seq-len {seq_len} exceeds the model's maximum length {lm.max_length}")
    check_finite(lm)
    t0 = time.perf_counter()
    ids = lm.tokenizer.encode(read_text(data, join_lines))
    if max_tokens is not None:
        ids = ids[:max_tokens]
    bos = lm.tokenizer.bos_token_id if lm.add_bos else None
    from .quant.qlinear import cached_dequant

    with cached_dequant():
        res = perplexity(lm.module, ids, seq_len, stride=stride, bos_token_id=bos, progress=track if progress else None)
    out = res.to_dict()
    out.update(params=count_params(lm.module), memory_bytes=memory_bytes(lm.module), eval_s=time.perf_counter() - t0,
               size_bytes=disk_bytes(size_path) if size_path is not None else model_disk_bytes(lm),
               model=lm.source, data=str(data))
    from .eval.report import MEASURES

    out["measures"] = {k: MEASURES[k] for k in ("size_bytes", "memory_bytes", "params", "perplexity", "tokens")}
    return out


def model_disk_bytes(lm: LoadedModel) -> int | None:
    """Bytes of the weight files the model was loaded from (a GGUF: its file, however it is held in
    RAM); None for an in-memory module or a hub download."""
    if lm.kind == "modelpress":
        return disk_bytes(lm.source)
    weights = [f for f in lm.files if f.suffix in (".safetensors", ".gguf", ".bin")]
    return sum(f.stat().st_size for f in weights) or None


def save(lm: LoadedModel, output: str | Path, *, recipe: Any = None, report: dict | None = None,
         overwrite: bool = False) -> Path:
    """Save atomically as safetensors + config + manifest (see :mod:`modelpress.export.saving`)."""
    from .export.saving import save_compressed

    rec = as_recipe(recipe) if recipe is not None and not isinstance(recipe, Recipe) else recipe
    path = save_compressed(lm, output, recipe=rec, report=report, overwrite=overwrite)
    if lm.lazy is not None and lm.lazy.run_folder is not None:  # streamed blocks are in the output now
        lm.lazy.run_folder.close()
    return path
