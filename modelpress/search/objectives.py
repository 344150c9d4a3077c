"""What one search trial measures: a real compression, saved, evaluated and timed.

:class:`TrialEvaluator` loads the base model (and its calibration tokens) once per process and,
for each trial, compresses a fresh copy with the trial's recipe through the ordinary Runner, saves
it (the size objective is the bytes of the saved weight files), measures perplexity on a bounded
number of tokens and the median batch-1 decode latency. The three objectives, all minimised:

  * ``perplexity``: exp(mean NLL) on the first ``eval_max_tokens`` tokens of ``eval_data``;
  * ``size_bytes``: bytes of the saved weight files on disk;
  * ``latency_ms``: median per-token decode time at batch 1 after installing the CPU kernels
    (:func:`modelpress.eval.perf.measure_generation`); a model our generation loop does not run
    is timed by whole forward passes of the prompt instead, divided by its length (said in
    ``latency_kind``).

Example:
    >>> ev = TrialEvaluator(EvalSettings(model="bundled:smollm2-135m-instruct", eval_data="bundled:wikitext2"))  # doctest: +SKIP
    >>> ev.evaluate(recipe, Path("out/trials/0003"))["objectives"]                                          # doctest: +SKIP
"""
from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.errors import ModelpressError
from ..eval.layer_stats import mean_final_bits
from ..pipeline.recipe import Recipe

#: The objectives, in the order the study holds them; all are minimised.
OBJECTIVES = ("perplexity", "size_bytes", "latency_ms")


@dataclass(frozen=True)
class EvalSettings:
    """How every trial is compressed and measured (the same for all trials of a study)."""

    model: str
    eval_data: str = "bundled:wikitext2"
    eval_max_tokens: int = 4096
    eval_seq_len: int | None = None
    join_lines: bool | None = None
    calib: str | None = None
    calib_samples: int = 32
    calib_seq_len: int = 512
    calib_seed: int = 0
    latency_prompt: int = 32
    latency_tokens: int = 16
    latency_dtype: str = "bfloat16"
    keep_models: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class TrialEvaluator:
    """Compresses and measures one recipe at a time against one loaded base model."""

    def __init__(self, settings: EvalSettings) -> None:
        from .. import api

        self.settings = settings
        self.base = api.load(settings.model)
        self._calib: Any = None

    def calibration(self, recipe: Recipe) -> Any:
        """The calibration tokens, built the first time a recipe needs them (then reused)."""
        from .. import api
        from ..data.sources import DEFAULT_CALIBRATION

        if not api.needs_calibration(recipe):
            return None
        if self._calib is None:
            s = self.settings
            self._calib = api.calibration_for(self.base, s.calib or DEFAULT_CALIBRATION, s.calib_samples,
                                              s.calib_seq_len, s.calib_seed)
        return self._calib

    def evaluate(self, recipe: Recipe, folder: Path) -> dict[str, Any]:
        """Compress a copy of the base model with ``recipe``, save it under ``folder`` and measure it.

        Returns ``{"objectives": {...}, "measures": {...}}``; the compress report and the evaluation
        are written to ``folder/compress_report.json`` and ``folder/eval.json``.
        """
        from .. import api

        s = self.settings
        if folder.exists():  # a trial killed earlier under this number left it: ours to replace
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        lm = dataclasses.replace(self.base, module=copy.deepcopy(self.base.module), layer_formats={})
        t0 = time.perf_counter()
        report = api.compress(lm, recipe, calib=self.calibration(recipe), progress=False)
        compress_s = time.perf_counter() - t0
        model_dir = api.save(lm, folder / "model", recipe=recipe, report=report)
        ev = api.evaluate(lm, s.eval_data, seq_len=s.eval_seq_len, max_tokens=s.eval_max_tokens,
                          join_lines=s.join_lines, progress=False, size_path=model_dir)
        lat = measure_latency(lm, s.latency_prompt, s.latency_tokens, s.latency_dtype)
        shutil.copyfile(model_dir / "report.json", folder / "compress_report.json")
        (folder / "eval.json").write_text(json.dumps(ev | {"latency": lat}, indent=1, default=str))
        if not s.keep_models:
            shutil.rmtree(model_dir)
        if ev.get("size_bytes") is None:
            raise ModelpressError(f"trial folder {model_dir} holds no weight files: its size cannot be measured")
        return {"objectives": {"perplexity": ev["perplexity"], "size_bytes": float(ev["size_bytes"]),
                               "latency_ms": lat["latency_ms"]},
                "measures": {"memory_bytes": ev["memory_bytes"], "params": ev["params"],
                             "bits_per_weight": mean_final_bits(report["layers"]), "compress_s": compress_s,
                             "compress_cpu_s": report.get("compress_cpu_s"), "eval_tokens": ev["tokens"],
                             "latency_kind": lat["latency_kind"], "decode_tokens_per_s": lat.get("decode_tokens_per_s"),
                             "ttft_s": lat.get("ttft_s")}}


def measure_latency(lm: Any, prompt_len: int, new_tokens: int, dtype: str = "bfloat16") -> dict[str, Any]:
    """Median batch-1 per-token latency in ms, with the CPU kernels installed (changes ``lm`` in place:
    call it last)."""
    from ..kernels import cast_float_parts, install_kernels

    dt = getattr(torch, dtype)
    install_kernels(lm.module, dtype=dt)
    cast_float_parts(lm.module, dt)
    vocab = lm.module.config.vocab_size
    try:
        from ..eval.perf import measure_generation
        from ..kernels.generate import LlamaRunner

        runner = LlamaRunner(lm.module, max_len=prompt_len + new_tokens + 8)
    except (ModelpressError, AttributeError):
        return _forward_latency(lm.module, vocab, prompt_len)
    r = measure_generation(runner, vocab, (1,), prompt_len, new_tokens)
    return {"latency_ms": r["decode_latency_ms"], "latency_kind": "decode, batch 1, median per token",
            "decode_tokens_per_s": r["decode_tokens_per_s"], "ttft_s": r["ttft_s"]}


@torch.no_grad()
def _forward_latency(model: torch.nn.Module, vocab: int, prompt_len: int, repeats: int = 5) -> dict[str, Any]:
    ids = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    model(ids)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model(ids)
        times.append(time.perf_counter() - t)
    return {"latency_ms": 1e3 * statistics.median(times) / prompt_len,
            "latency_kind": "forward of the prompt, batch 1, median / prompt tokens"}
