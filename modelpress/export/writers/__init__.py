"""Export writers, one per target (``hf``, ``compressed-tensors``, ``gguf``), and the shared plumbing.

Each writer is a function ``write(lm, out, options) -> ExportReport`` registered in ``WRITERS``
under its :class:`~modelpress.export.plan.ExportFormat` value. Writers build their output in a
hidden temporary folder that is renamed into place only when complete
(:func:`modelpress.core.outputs.atomic_output`: it replaces only an output modelpress wrote).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch.nn as nn

from ...core.config import Registry
from ...core.errors import ModelpressError
from ...core.outputs import atomic_output  # noqa: F401  (re-exported for the writers)
from ...models.loading import LoadedModel
from ..plan import ExportReport

Writer = Callable[..., ExportReport]

#: ExportFormat value -> writer function. Writer modules register themselves.
WRITERS: Registry[Writer] = Registry("export format")


def skeleton(lm: LoadedModel) -> nn.Module | None:
    """The model's plain architecture on the meta device (original layer classes, no weights).

    Writers ask it what a replaced layer was (``nn.Linear``, GPT-2's ``Conv1D`` ...).
    """
    import torch

    cfg = getattr(lm.module, "config", None)
    if cfg is None:
        return None
    with torch.device("meta"):
        return type(lm.module)(cfg)


def original_class(skel: nn.Module | None, name: str) -> type[nn.Module] | None:
    if skel is None:
        return None
    try:
        return type(skel.get_submodule(name))
    except AttributeError:
        return None


def save_tokenizer(lm: LoadedModel, folder: Path) -> bool:
    """Save the tokenizer files beside the weights when the model has one."""
    if lm.tokenizer is None:
        return False
    lm.tokenizer.save(folder)
    return True


def options_error(fmt: str, **given: Any) -> None:
    """A one-line error for options that do not apply to ``fmt``."""
    bad = [k for k, v in given.items() if v is not None]
    if bad:
        raise ModelpressError(f"--{bad[0].replace('_', '-')} does not apply to --format {fmt}")
