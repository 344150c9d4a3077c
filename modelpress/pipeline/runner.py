"""The Runner: one owner for a compression run.

It validates the recipe against the model, owns the run's working folder (its own subfolder of
``--workdir``, see :mod:`.workdir`), builds each stage's typed context (calibration and training
data, the frozen float reference, gradient mode, device, rank), groups consecutive block-wise
stages into one sequential pass (with checkpoints a rerun resumes from), measures the model before
and after when asked, and returns the report: per-stage timings, per-layer results, warnings,
memory, and the before/after evaluation. The CLI and the Python API both get that report from here.

Example:
    >>> report = Runner(lm, "gptq-w4-g64", calib=calib, evaluation=EvalSpec("bundled:wikitext2")).run()  # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..calib.blocks import capture_first_block_inputs
from ..calib.data import Calibration
from ..core.errors import EnvironmentFailure, ModelpressError
from ..core.method import METHODS, MethodConfig, MethodEntry, StageContext, StageKind
from ..core.progress import track
from ..core.threads import matmul_precision, torch_matmul_precision
from ..eval.size import count_params, memory_bytes, peak_rss_bytes
from ..models.loading import LoadedModel
from ..models.selection import check_model_finite
from . import sequential
from .recipe import Recipe
from .reference import FloatReference
from .workdir import RunFolder

BLOCK_KINDS = (StageKind.BLOCKWISE, StageKind.RECONSTRUCTION)


@dataclass(frozen=True)
class EvalSpec:
    """What to measure before and after the stages (perplexity on a text, as ``modelpress eval``)."""

    data: str
    seq_len: int | None = None
    max_tokens: int | None = None
    stride: int | None = None
    join_lines: bool | None = None

    def kwargs(self) -> dict[str, Any]:
        return {"seq_len": self.seq_len, "max_tokens": self.max_tokens, "stride": self.stride,
                "join_lines": self.join_lines}


def stage_groups(rec: Recipe) -> list[list[MethodConfig]]:
    """Consecutive block-wise (and reconstruction) stages share one sequential pass (AWQ then GPTQ
    then a reconstruction on each block); every other stage runs alone."""
    groups: list[list[MethodConfig]] = []
    for st in rec.stages:
        block = METHODS.get(st.method).kind in BLOCK_KINDS
        if block and groups and METHODS.get(groups[-1][0].method).kind in BLOCK_KINDS:
            groups[-1].append(st)
        else:
            groups.append([st])
    return groups


class Runner:
    """Runs a recipe on a loaded model in place (see the module docstring)."""

    def __init__(self, lm: LoadedModel, recipe: Recipe, *, calib: Calibration | None = None,
                 train: Any = None, workdir: str | Path | None = None,
                 remove_workdir_if_empty: bool = False, offload_activations: bool = False, progress: bool = True,
                 evaluation: EvalSpec | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32, rank: int = 0, world_size: int = 1,
                 evaluate: Callable[..., dict[str, Any]] | None = None, matmul_precision: str = "fp32") -> None:
        self.lm, self.recipe, self.calib, self.train = lm, recipe, calib, train
        self.folder = RunFolder(workdir, remove_parent_if_empty=remove_workdir_if_empty) if workdir else None
        self.offload, self.progress, self.evaluation = offload_activations, progress, evaluation
        self.device = torch.device(device) if device is not None else _model_device(lm)
        self.dtype, self.rank, self.world_size = dtype, rank, world_size
        try:  # refused before any work, as a user error
            torch_matmul_precision(matmul_precision)
        except ValueError as e:
            raise ModelpressError(str(e)) from None
        self.matmul_precision = matmul_precision
        self._evaluate = evaluate
        self.entries: list[MethodEntry] = [METHODS.get(st.method) for st in recipe.stages]
        self.reference: FloatReference | None = None
        self.timings: list[dict[str, Any]] = []

    # ---- checks before any work ----------------------------------------------------------------
    def check(self) -> None:
        """Refuse what cannot run, before anything is changed or loaded: an empty recipe, a model
        with non-finite values, a stage without the data it needs."""
        if not self.recipe.stages:
            raise ModelpressError(f"recipe {self.recipe.name!r} has no stages: nothing would be compressed")
        check_model_finite(self.lm)
        for st, entry in zip(self.recipe.stages, self.entries):
            if entry.needs_calibration and self.calib is None:
                raise ModelpressError(f"method {st.method!r} needs calibration data: pass --calib FILE")
            if entry.needs_training_data and self.train is None and self.calib is None:
                raise ModelpressError(f"method {st.method!r} trains: pass --train FILE (or --calib FILE)")
        if self.evaluation is not None and self.lm.lazy is not None:
            raise ModelpressError("--low-memory cannot evaluate the float baseline (it never holds the whole model); "
                                  "drop --eval-data and run `modelpress eval` on the output")

    # ---- the run --------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Apply every stage and return the report."""
        t0, c0 = time.perf_counter(), time.process_time()
        before = self._measure() if self.evaluation else None
        ctx = self.apply()
        report = self.report(ctx, time.perf_counter() - t0 - (before or {}).get("eval_s", 0.0), time.process_time() - c0)
        if self.evaluation:
            from ..eval.report import comparison

            report["eval"] = comparison(before, self._measure())
        return report

    def apply(self) -> StageContext:
        """Apply every stage in place; returns the filled stage context."""
        self.check()
        ctx = self._context()
        try:
            if any(e.uses_reference(st) for e, st in zip(self.entries, self.recipe.stages)):
                self.reference = FloatReference.snapshot(self.lm, ctx.workdir)
                ctx.reference = self.reference
            floats = self._float_inputs(ctx)
            for group in stage_groups(self.recipe):
                self._run_group(group, ctx, floats)
        except ModelpressError as e:
            if self.folder is not None and not isinstance(e, EnvironmentFailure):
                self.folder.close()  # refused: nothing to resume (a disk-full run keeps its checkpoints)
            raise
        finally:
            if self.reference is not None:
                self.reference.close()
        self._close_folder()
        return ctx

    def _context(self) -> StageContext:
        ctx = StageContext(calib=self.calib.ids if self.calib else None, train=self.train,
                           progress=track if self.progress else None,
                           workdir=str(self.folder.open()) if self.folder else None,
                           offload_activations=self.offload, device=self.device, dtype=self.dtype,
                           matmul_precision=self.matmul_precision,
                           rank=self.rank, world_size=self.world_size, recipe=self.recipe.to_dict())
        if self.folder is not None:
            from ..models.fingerprint import source_digest

            ctx.source_id = source_digest(self.lm)  # by content: a replaced file at the same path is another job
        ctx.run_blocks = lambda stages, checkpoints=False: self._blocks(  # noqa: E731
            [(s, getattr(s, "name", type(s).__name__), False) for s in stages], ctx, None, checkpoints)
        return ctx

    def _float_inputs(self, ctx: StageContext) -> Any:
        """The float stream's first-block inputs, captured before any stage changes the model."""
        if self.calib is None or not any(e.kind == StageKind.RECONSTRUCTION for e in self.entries):
            return None
        with torch.no_grad():
            floats = capture_first_block_inputs(self.lm, self.calib.ids)
        floats.precision = ctx.matmul_precision
        return floats

    def _run_group(self, group: list[MethodConfig], ctx: StageContext, floats: Any) -> None:
        entries = [METHODS.get(st.method) for st in group]
        t0, c0 = time.perf_counter(), time.process_time()
        n0, m0 = len(ctx.layers), len(ctx.metrics)
        kind = entries[0].kind
        if kind in BLOCK_KINDS:
            stages = [(e.block_stage(self.lm, st), st.method, e.kind == StageKind.RECONSTRUCTION)
                      for st, e in zip(group, entries)]
            self._blocks(stages, ctx, floats, all(e.checkpoints for e in entries), group)
        else:
            if self.lm.lazy is not None:
                ctx.warn(f"{group[0].method} is not block-wise: all blocks were loaded into memory for it")
                self.lm.lazy.ensure_all()
            ctx.grad = entries[0].grad
            # a training stage's forwards and backwards run at the run's matmul precision; other
            # whole-model stages (data-free, their own solvers) at full precision
            with _grad_mode(entries[0].grad), matmul_precision(ctx.matmul_precision if entries[0].grad else "fp32"):
                entries[0].run(self.lm, group[0], ctx)
            ctx.grad = False
        kinds = list(dict.fromkeys(e.kind.value for e in entries))  # a pass can mix blockwise and reconstruction
        self.timings.append({"stages": [st.method for st in group], "kind": "+".join(kinds),
                             "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
                             "layers": len(ctx.layers) - n0, "metrics": ctx.metrics[m0:]})

    def _blocks(self, stages: list[tuple[Any, str, bool]], ctx: StageContext, floats: Any, checkpoints: bool,
                group: list[MethodConfig] | None = None) -> None:
        """One sequential pass of ``stages`` over the decoder blocks (see :mod:`.sequential`)."""
        needs_inputs = any(getattr(s, "needs_inputs", True) for s, _, _ in stages)
        if needs_inputs and ctx.calib is None:
            raise ModelpressError(f"{stages[0][1]} needs calibration data (--calib FILE)")
        sig = ({"source": ctx.source_id, "recipe": self.recipe.to_dict(), "stages": [st.to_dict() for st in group]}
               if group is not None else None)
        before = self.lm.lazy.ensure if self.lm.lazy is not None else None
        with torch.no_grad():
            if not needs_inputs:
                sequential.run_without_inputs(self.lm, stages, ctx, before_block=before)
            else:
                sequential.run_sequential(self.lm, stages, ctx, signature=sig, before_block=before,
                                          checkpoints=checkpoints, reference=self.reference, float_inputs=floats)
        for s, _, _ in stages:
            finish = getattr(s, "finish", None)
            if finish is not None:
                finish(self.lm, ctx)

    def _close_folder(self) -> None:
        if self.folder is None:
            return
        if self.lm.lazy is not None and self.lm.lazy.workdir is not None:
            self.lm.lazy.run_folder = self.folder  # the saver streams the offloaded blocks from it, then closes it
        else:
            self.folder.close()

    # ---- measuring and reporting -------------------------------------------------------------
    def _measure(self) -> dict[str, Any]:
        if self._evaluate is None:
            raise ModelpressError("evaluation asked, but the runner was given no evaluate function")
        return self._evaluate(self.lm, self.evaluation.data, progress=self.progress, **self.evaluation.kwargs())

    def report(self, ctx: StageContext, seconds: float, cpu_seconds: float) -> dict[str, Any]:
        """The run's report (JSON-able): what each stage did to each layer, and what it cost."""
        layers = [vars(r) for r in ctx.layers]
        bits, mean_bits = final_bits(layers)
        return {
            "model": self.lm.source, "recipe": self.recipe.to_dict(),
            "calibration": self.calib.info if self.calib else None,
            "layers": layers, "warnings": ctx.warnings, "stages": self.timings,
            "compress_s": seconds, "compress_cpu_s": cpu_seconds,  # CPU: all threads, robust to a busy machine
            "matmul_precision": self.matmul_precision,
            "n_quantized": len(bits), "mean_bits_per_weight": mean_bits,
            "peak_rss_bytes": peak_rss_bytes(), "params": count_params(self.lm.module),
            "memory_bytes": memory_bytes(self.lm.module),
        }


def final_bits(layers: list[dict[str, Any]]) -> tuple[dict[str, float], float | None]:
    """Each layer's bits per weight after the *last* stage that recorded it, and their mean weighted
    by the layers' sizes (out x in).

    Why: a layer two stages touched (prune then quantise, GPTQ then Block-AP) has two records; the
    mean over records counted it twice, and an unweighted mean let a 576 x 64 layer weigh as much as a
    1536 x 576 one, which is not what bits per weight means for the model's files.
    """
    last: dict[str, dict[str, Any]] = {}
    for r in layers:
        if r.get("bits_per_weight"):
            last[r["name"]] = r
    bits = {n: float(r["bits_per_weight"]) for n, r in last.items()}
    sizes = {n: (r["shape"][0] * r["shape"][1] if r.get("shape") else 1) for n, r in last.items()}
    total = sum(sizes.values())
    return bits, (sum(bits[n] * sizes[n] for n in bits) / total if total else None)


@contextlib.contextmanager
def _grad_mode(enabled: bool) -> Iterator[None]:
    with torch.enable_grad() if enabled else torch.no_grad():
        yield


def _model_device(lm: LoadedModel) -> torch.device:
    return next((p.device for p in lm.module.parameters() if not p.is_meta), torch.device("cpu"))
