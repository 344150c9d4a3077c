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

from .calib.data import DEFAULT_CALIB_SAMPLES, DEFAULT_CALIB_SEQ_LEN, Calibration
from .core.errors import ModelpressError
from .core.progress import track
from .data.sources import DEFAULT_CALIBRATION, DEFAULT_EVALUATION, read_text
from .eval.perplexity import perplexity
from .eval.size import count_params, disk_bytes, memory_bytes
from .models.loading import LoadedModel, load_model
from .core.method import METHODS, MethodConfig, RunContext
from .pipeline.recipe import Recipe, load_recipe
from .models.selection import check_model_finite


def load(model: str | Path | nn.Module | LoadedModel, *, low_memory: bool = False, **kw: Any) -> LoadedModel:
    """Load a model (hub id, folder, .gguf, llama2.c .bin, modelpress output, or nn.Module).

    ``low_memory`` (a local safetensors folder, or a plain-architecture .gguf): decoder blocks are
    read from disk only when the sequential engine reaches them, so models larger than RAM can be
    compressed.
    """
    if isinstance(model, LoadedModel):
        return model
    if low_memory:
        from .models.lazy import load_lazy, load_lazy_gguf
        from .models.loading import resolve_bundled

        path = resolve_bundled(str(model)) if str(model).startswith("bundled:") else Path(str(model)).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            return load_lazy_gguf(path)
        if not path.is_dir():
            raise ModelpressError("--low-memory needs a local folder of safetensors weights or a .gguf file")
        return load_lazy(path, trust_remote_code=kw.get("trust_remote_code", False))
    return load_model(model, **kw)


def as_recipe(recipe: str | Path | Recipe | MethodConfig | dict) -> Recipe:
    """A Recipe from a built-in name, YAML path, dict, Recipe or a single method config."""
    if isinstance(recipe, MethodConfig):
        return Recipe(name=f"single-{recipe.method}", stages=[recipe])
    return load_recipe(recipe)


def calibration_for(lm: LoadedModel, calib: str | Path | torch.Tensor | Calibration | None = DEFAULT_CALIBRATION,
                    n_samples: int = DEFAULT_CALIB_SAMPLES, seq_len: int = DEFAULT_CALIB_SEQ_LEN, seed: int = 0,
                    chat: bool = False) -> Calibration | None:
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


def training_for(lm: LoadedModel, source: str | Path | None = None, n_samples: int = 512, seq_len: int = 256,
                 seed: int = 0) -> Any:
    """Training sequences (``distill.trainer.TrainData``) from a text source (default: the bundled C4
    excerpt): token-stream windows for a language model, padded sentences for an encoder."""
    from .distill.data import training_data
    from .distill.method import is_language_model

    seq_len = min(seq_len, lm.max_length or seq_len)
    return training_data(lm, source or DEFAULT_CALIBRATION, n_samples, seq_len, seed, is_language_model(lm.module))


def needs_training(recipe: str | Path | Recipe | MethodConfig | dict) -> bool:
    """Whether any stage of ``recipe`` trains (and so reads ``--train`` text)."""
    return any(METHODS.get(st.method).needs_training_data for st in as_recipe(recipe).stages)


def needs_calibration(recipe: str | Path | Recipe | MethodConfig | dict) -> bool:
    """Whether any stage of ``recipe`` needs calibration data."""
    return any(METHODS.get(st.method).needs_calibration for st in as_recipe(recipe).stages)


def apply(lm: LoadedModel, recipe: str | Path | Recipe | MethodConfig | dict, *,
          calib: torch.Tensor | Calibration | None = None, progress: bool = True, workdir: str | Path | None = None,
          offload_activations: bool = False, remove_workdir_if_empty: bool = False,
          train: torch.Tensor | None = None, matmul_precision: str = "fp32") -> RunContext:
    """Apply every stage of ``recipe`` to ``lm`` in place; returns the filled stage context.

    ``workdir`` enables per-block checkpoints (a rerun resumes): the run works in its own
    subfolder there and removes only that (see :mod:`modelpress.pipeline.workdir`);
    ``offload_activations`` keeps the calibration activations in a memory-mapped file there.
    ``matmul_precision="bf16"`` runs the calibration forwards, statistics products and training
    stages at torch's "medium" float32 matmul precision (faster; solvers stay fp32).
    """
    return _runner(lm, recipe, calib, train, progress, workdir, offload_activations, remove_workdir_if_empty,
                   matmul_precision=matmul_precision).apply()


def compress(lm: LoadedModel, recipe: Any, *, calib: torch.Tensor | Calibration | None = None, progress: bool = True,
             workdir: str | Path | None = None, offload_activations: bool = False,
             remove_workdir_if_empty: bool = False, train: torch.Tensor | None = None,
             eval_data: str | Path | None = None, eval_seq_len: int | None = None, eval_max_tokens: int | None = None,
             eval_stride: int | None = None, eval_join_lines: bool | None = None,
             matmul_precision: str = "fp32") -> dict[str, Any]:
    """Apply ``recipe`` and return the report: per-stage timings, per-layer formats and errors,
    memory, the calibration data's provenance and, with ``eval_data``, perplexity before and after."""
    from .pipeline.runner import EvalSpec

    ev = EvalSpec(str(eval_data), eval_seq_len, eval_max_tokens, eval_stride, eval_join_lines) if eval_data else None
    return _runner(lm, recipe, calib, train, progress, workdir, offload_activations, remove_workdir_if_empty, ev,
                   matmul_precision).run()


def _runner(lm: LoadedModel, recipe: Any, calib: Any, train: Any, progress: bool, workdir: Any, offload: bool,
            remove_workdir: bool, evaluation: Any = None, matmul_precision: str = "fp32") -> Any:
    from .pipeline.runner import Runner

    cal = calib if isinstance(calib, Calibration) or calib is None else Calibration.from_ids(calib)
    return Runner(lm, as_recipe(recipe), calib=cal, train=train, workdir=workdir, remove_workdir_if_empty=remove_workdir,
                  offload_activations=offload, progress=progress, evaluation=evaluation, evaluate=evaluate,
                  matmul_precision=matmul_precision)


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
    check_model_finite(lm)
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
