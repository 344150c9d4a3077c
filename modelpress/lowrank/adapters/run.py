"""One adapter run, the Python function behind ``modelpress adapt``: attach, train, save in PEFT's
format, optionally merge (re-quantising a quantised base) and save the merged model.

Output folder::

    OUTPUT/adapter_config.json, adapter_model.safetensors   PEFT's own files (PeftModel.from_pretrained)
    OUTPUT/adapt_report.json                                 method, targets, tokens, CPU s, losses, merge
    OUTPUT/merged/                                           with a merge: a modelpress model folder

Example:
    >>> lm = mp.load("out/smollm2-qlora-nf4")                                                  # doctest: +SKIP
    >>> adapt(lm, AdapterConfig(method="lora"), TrainConfig(steps=60, batch_size=4), "input.txt",
    ...       "out/adapter", seq_len=128)                                                      # doctest: +SKIP
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ...core.errors import ModelpressError
from ...distill.data import training_data
from ...distill.trainer import TrainConfig, TrainData
from ...export.saving import save_compressed
from ...models.loading import LoadedModel
from .adapt import AdapterConfig, attach, merge_adapter, train_adapter

REPORT = "adapt_report.json"


def check_output(output: str | Path) -> Path:
    """An adapter output must be a new folder (refused before a slow load or training)."""
    out = Path(output)
    if out.exists() or out.is_symlink():
        raise ModelpressError(f"output {out} exists; adapters are written to a new folder")
    return out


def adapt(lm: LoadedModel, cfg: AdapterConfig, train: TrainConfig, data: str | Path, output: str | Path, *,
          seq_len: int = 256, merge: bool = False, merge_dense: bool = False,
          progress: bool = True) -> dict[str, Any]:
    """Train ``cfg``'s adapter on ``lm`` over text ``data`` and write it to ``output``; returns the
    report (also written as ``adapt_report.json``). ``lm.module`` ends as the trained PEFT model, or
    the merged plain model with ``merge`` (quantised layers re-quantised) or ``merge_dense`` (quantised
    layers the adapter wraps become dense ``W + ΔW``)."""
    out = check_output(output)
    steps = train.total_steps(seq_len)
    samples = steps * train.batch_size if steps else 512  # each window seen once (fewer with a minutes budget)
    data_ = training_data(lm, data, samples, min(seq_len, lm.max_length or seq_len), train.seed)
    pm = attach(lm.module, cfg, total_steps=steps)
    pm.peft_config[pm.active_adapter].base_model_name_or_path = str(lm.source)
    trainable, total = pm.get_nb_trainable_parameters()
    result = train_adapter(pm, data_, train, progress=progress)
    pm.save_pretrained(str(out))
    report: dict[str, Any] = {"model": str(lm.source), "adapter": cfg.to_dict(), "train": train.to_dict(),
                              "trainable_params": int(trainable), "all_params": int(total),
                              "result": result.to_dict(), "files": sorted(p.name for p in out.iterdir())}
    lm.module = pm
    if merge or merge_dense:
        lm.module, rep = merge_adapter(pm, _probe(data_), dense=merge_dense)
        report["merge"] = rep.to_dict()
        save_compressed(lm, out / "merged")
    (out / REPORT).write_text(json.dumps(report, indent=1))
    return report


def _probe(data: TrainData, rows: int = 2) -> torch.Tensor:
    """A few training sequences (rows, L) to measure the merge's output error on."""
    return data.input_ids[:rows]
