"""Export writers, one per target (``hf``, ``compressed-tensors``, ``gguf``), and the shared plumbing.

Each writer is a function ``write(lm, out, **options) -> ExportReport`` registered with
:func:`register_writer` under its target's name, together with the options it takes; the CLI's
``--format`` choices and option flags come from this registry. Writers build their output in a
hidden temporary folder that is renamed into place only when complete
(:func:`modelpress.core.outputs.atomic_output`: it replaces only an output modelpress wrote).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch.nn as nn

from ...core.config import Registry
from ...core.outputs import atomic_output  # noqa: F401  (re-exported for the writers)
from ...models.loading import LoadedModel
from ..plan import ExportReport

@dataclass(frozen=True)
class WriterOption:
    """One option of a writer: its CLI flag (``--gguf-type``), keyword, default, help and choices."""

    flag: str
    help: str
    default: Any = None
    choices: tuple[str, ...] | None = None
    keyword: str | None = None  # the writer's keyword argument (default: the flag with '_' for '-')

    @property
    def dest(self) -> str:
        return self.keyword or self.flag.replace("-", "_")


@dataclass(frozen=True)
class Writer:
    """A registered export target."""

    name: str
    write: Callable[..., ExportReport]
    options: tuple[WriterOption, ...] = ()
    summary: str = ""
    single_file: bool = False  # the output is one file (``.gguf``), not a folder


#: target name -> writer. Writer modules register themselves (found under this package).
WRITERS: Registry[Writer] = Registry("export format", packages=("modelpress.export.writers",))


def register_writer(name: str, *, options: tuple[WriterOption, ...] = (), summary: str = "",
                    single_file: bool = False) -> Callable[[Callable[..., ExportReport]], Callable[..., ExportReport]]:
    """Function decorator registering an export writer and the options it takes.

    Example:
        >>> @register_writer("mytarget", options=(WriterOption("my-flag", "what it does", default="x"),))
        ... def write_mytarget(lm, output, *, my_flag="x", overwrite=False, **_): ...  # doctest: +SKIP
    """
    def deco(fn: Callable[..., ExportReport]) -> Callable[..., ExportReport]:
        WRITERS.register(name)(Writer(name, fn, options, summary or (fn.__doc__ or "").strip().splitlines()[0], single_file))
        return fn

    return deco


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


