"""Students built from their teacher: a subset of its layers (DistilBERT's initialisation), the
teacher's own compressed self (Minitron: prune, then distil into it), or a fresh model from a
config. A student always keeps the teacher's tokenizer.
"""
from __future__ import annotations

import copy
from typing import Any, Literal

import torch.nn as nn
from pydantic import Field, model_validator

from ..core.config import Config
from ..core.errors import ModelpressError
from ..models.archspec import get_blocks
from ..models.loading import LoadedModel


class StudentSpec(Config):
    """Which student to train.

    ``layers``: a copy of the teacher keeping the blocks in ``keep`` (default: ``n // every`` evenly
    spaced blocks, the first and last included); ``self``: the model as earlier stages left it
    (the teacher is then the float reference); ``config``: a fresh, randomly initialised model of
    the teacher's architecture with ``config`` overrides (``num_hidden_layers``, ``hidden_size`` ...).
    """

    kind: Literal["layers", "self", "config"] = "layers"
    keep: list[int] | None = None
    every: int = Field(2, ge=1)
    config: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "StudentSpec":
        if self.kind == "config" and not self.config:
            raise ValueError("student kind 'config' needs config overrides, e.g. {num_hidden_layers: 4}")
        if self.keep is not None and (self.kind != "layers" or not self.keep):
            raise ValueError("keep lists the teacher's blocks a 'layers' student keeps (at least one)")
        return self


def evenly_spaced(n: int, k: int) -> list[int]:
    """``k`` of ``n`` block indices spread evenly, first and last included.

    Example:
        >>> evenly_spaced(6, 3), evenly_spaced(30, 15)[:4], evenly_spaced(4, 1)
        ([0, 2, 5], [0, 2, 4, 6], [0])
    """
    if k <= 1:
        return [0]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def build_student(teacher: LoadedModel, spec: StudentSpec) -> nn.Module:
    """The student model (a new module; the teacher is left as it is)."""
    if spec.kind == "self":
        return teacher.module
    if spec.kind == "config":
        return _from_config(teacher, spec.config or {})
    blocks = get_blocks(teacher.module, teacher.spec) if teacher.spec else []
    if not blocks:
        raise ModelpressError("a student of the teacher's layers needs a known architecture with decoder/encoder blocks")
    n = len(blocks)
    keep = spec.keep if spec.keep is not None else evenly_spaced(n, max(1, n // spec.every))
    bad = [i for i in keep if not 0 <= i < n]
    if bad:
        raise ModelpressError(f"student keep {bad}: the teacher has blocks 0..{n - 1}")
    from ..sparsity.structured.shrink import remove_layers

    student = copy.copy(teacher)
    student.module = copy.deepcopy(teacher.module)
    remove_layers(student, [i for i in range(n) if i not in set(keep)])
    return student.module


def _from_config(teacher: LoadedModel, overrides: dict[str, Any]) -> nn.Module:
    cfg = getattr(teacher.module, "config", None)
    if cfg is None:
        raise ModelpressError("a student from a config needs a Hugging Face teacher (it has no config)")
    new = copy.deepcopy(cfg)
    for k, v in overrides.items():
        if not hasattr(new, k):
            raise ModelpressError(f"student config: {type(cfg).__name__} has no field {k!r}")
        setattr(new, k, v)
    return type(teacher.module)(new)
