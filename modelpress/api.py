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

from .core.errors import ModelpressError
from .core.progress import track
from .eval.perplexity import perplexity, read_text
from .eval.size import count_params, disk_bytes, memory_bytes, peak_rss_bytes
from .models.loading import LoadedModel, load_model
from .pipeline.methods import METHODS, MethodConfig, RunContext
from .pipeline.recipe import Recipe, load_recipe, register_builtin_methods


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
    register_builtin_methods()
    if isinstance(recipe, MethodConfig):
        return Recipe(name=f"single-{recipe.method}", stages=[recipe])
    return load_recipe(recipe)


def calibration_for(lm: LoadedModel, calib: str | Path | torch.Tensor | None, n_samples: int = 128,
                    seq_len: int = 2048, seed: int = 0, chat: bool = False) -> torch.Tensor | None:
    """Calibration token ids from a file/dataset spec (or pass a ready (N, L) tensor through)."""
    if calib is None or isinstance(calib, torch.Tensor):
        return calib
    from .calib.data import calibration_tokens

    seq_len = min(seq_len, lm.max_length or seq_len)
    return calibration_tokens(lm.tokenizer, calib, n_samples, seq_len, seed,
                              bos_token_id=lm.tokenizer.bos_token_id if lm.add_bos else None, chat=chat)


def apply(lm: LoadedModel, recipe: str | Path | Recipe | MethodConfig | dict, *, calib: torch.Tensor | None = None,
          progress: bool = True, workdir: str | Path | None = None, offload_activations: bool = False) -> RunContext:
    """Apply every stage of ``recipe`` to ``lm`` in place; returns the filled run context.

    ``workdir`` enables per-block checkpoints (a rerun resumes); ``offload_activations`` keeps the
    calibration activations in a memory-mapped file there instead of RAM.
    """
    rec = as_recipe(recipe)
    ctx = RunContext(calib=calib, progress=track if progress else None, workdir=str(workdir) if workdir else None,
                     offload_activations=offload_activations)
    for group in _stage_groups(rec):
        entry = METHODS.get(group[0].method)
        if entry.needs_calibration and calib is None:
            raise ModelpressError(f"method {group[0].method!r} needs calibration data: pass --calib FILE")
        with torch.no_grad():
            if entry.block_stage is None:
                if lm.lazy is not None:
                    ctx.warn(f"{group[0].method} is not block-wise: all blocks were loaded into memory for it")
                    lm.lazy.ensure_all()
                entry.run(lm, group[0], ctx)
            else:
                _run_calibrated(lm, rec, group, ctx)
    return ctx


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
    sig = {"source": lm.source, "recipe": rec.to_dict(), "stages": [st.to_dict() for st in group]}
    before = lm.lazy.ensure if lm.lazy is not None else None
    run_sequential(lm, stages, ctx, signature=sig, before_block=before)


def compress(lm: LoadedModel, recipe: Any, *, calib: torch.Tensor | None = None, progress: bool = True,
             workdir: str | Path | None = None, offload_activations: bool = False) -> dict[str, Any]:
    """Apply ``recipe`` and return the report (per-layer formats and errors, timings, memory)."""
    rec = as_recipe(recipe)
    t0, c0 = time.perf_counter(), time.process_time()
    ctx = apply(lm, rec, calib=calib, progress=progress, workdir=workdir, offload_activations=offload_activations)
    layers = [vars(r) for r in ctx.layers]
    bits = [r["bits_per_weight"] for r in layers if r.get("bits_per_weight")]
    return {
        "model": lm.source, "recipe": rec.to_dict(), "layers": layers, "warnings": ctx.warnings,
        "compress_s": time.perf_counter() - t0, "n_quantized": len(bits),
        "compress_cpu_s": time.process_time() - c0,  # all threads; robust to a busy machine, unlike wall time
        "mean_bits_per_weight": sum(bits) / len(bits) if bits else None, "peak_rss_bytes": peak_rss_bytes(),
        "params": count_params(lm.module), "memory_bytes": memory_bytes(lm.module),
    }


def evaluate(lm: LoadedModel, data: str | Path, *, seq_len: int | None = None, max_tokens: int | None = None,
             stride: int | None = None, join_lines: bool = False, progress: bool = True,
             size_path: str | Path | None = None) -> dict[str, Any]:
    """Perplexity and size of ``lm`` on a text file (GPTQ protocol; sliding window with ``stride``)."""
    if lm.tokenizer is None:
        raise ModelpressError(f"model {lm.source} has no tokenizer; perplexity needs one")
    seq_len = seq_len or min(2048, lm.max_length or 2048)
    if lm.max_length and seq_len > lm.max_length:
        raise ModelpressError(f"--seq-len {seq_len} exceeds the model's maximum length {lm.max_length}")
    t0 = time.perf_counter()
    ids = lm.tokenizer.encode(read_text(data, join_lines))
    if max_tokens:
        ids = ids[:max_tokens]
    bos = lm.tokenizer.bos_token_id if lm.add_bos else None
    from .quant.qlinear import cached_dequant

    with cached_dequant():
        res = perplexity(lm.module, ids, seq_len, stride=stride, bos_token_id=bos, progress=track if progress else None)
    out = res.to_dict()
    out.update(params=count_params(lm.module), memory_bytes=memory_bytes(lm.module), eval_s=time.perf_counter() - t0,
               size_bytes=disk_bytes(size_path if size_path is not None else _disk_source(lm)) or memory_bytes(lm.module),
               model=lm.source, data=str(data))
    return out


def _disk_source(lm: LoadedModel) -> str | None:
    """The model's files on disk, or None when the in-memory model is what counts.

    A GGUF is dequantised to fp32 by transformers, so its file size is not the size of the model
    being compressed: the fp32 bytes in memory stand for it instead.
    """
    if lm.kind in ("gguf", "module"):
        return None
    p = Path(lm.source)
    return str(p) if p.exists() else None


def save(lm: LoadedModel, output: str | Path, *, recipe: Any = None, report: dict | None = None,
         overwrite: bool = False) -> Path:
    """Save atomically as safetensors + config + manifest (see :mod:`modelpress.export.saving`)."""
    from .export.saving import save_compressed

    rec = as_recipe(recipe) if recipe is not None and not isinstance(recipe, Recipe) else recipe
    path = save_compressed(lm, output, recipe=rec, report=report, overwrite=overwrite)
    if lm.lazy is not None and lm.lazy.workdir is not None:  # streamed blocks are in the output now
        import shutil

        shutil.rmtree(lm.lazy.workdir, ignore_errors=True)
    return path
