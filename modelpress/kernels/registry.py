"""Kernel registry keyed by (op, format, backend), with the pure-torch reference always available.

A kernel is a class that turns one weight of its op (for ``linear``, a quantised :class:`QTensor`
plus bias; for ``lowrank``, a float :class:`~modelpress.kernels.lowrank.FactorPair`) into a module
computing the same map faster on some device. It says *why* it cannot take a weight
(``unsupported`` returns a reason, or None), so selection can fall back to the reference and say
so instead of failing or silently running something else. ``reference`` serves every op: the
layer is left as it is.

Selection order for one layer: the kernel named by the caller, else the ``MODELPRESS_KERNEL``
environment variable, else ``auto`` (the highest-priority kernel registered for the weight's
format and the device that accepts it). A named kernel that cannot run falls back to the
reference kernel with a note naming the layer and the reason.

Example:
    >>> from modelpress.quant.formats import IntFormat
    >>> qt = IntFormat(bits=4, granularity=128).quantize(torch.randn(64, 256))
    >>> choice = select_kernel(qt, torch.device("cpu"), prefer="auto")
    >>> choice.kernel.name
    'int4pack'
"""
from __future__ import annotations

import contextlib
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar, Iterator, Protocol

import torch
import torch.nn as nn

from ..core.errors import ModelpressError
from ..quant.formats.base import QTensor

ENV_VAR = "MODELPRESS_KERNEL"
AUTO = "auto"
REFERENCE = "reference"


class Weight(Protocol):
    """A kernel weight other than a QTensor (e.g. a factor pair): only its format key is shared."""

    format_tag: str


def format_tag(w: QTensor | Weight) -> str:
    """The key a kernel's ``formats`` match: a QTensor's format tag, else the weight's own ``format_tag``."""
    return w.fmt.type_tag if isinstance(w, QTensor) else w.format_tag


class Kernel(Protocol):
    """What a registered kernel provides (classes with these class attributes and classmethods)."""

    name: ClassVar[str]
    op: ClassVar[str]  # "linear", "lowrank" ("*" for the reference: every op)
    formats: ClassVar[tuple[str, ...]]  # weight format tags it accepts ("*": any); see ``format_tag``
    backend: ClassVar[str]  # "cpu", "cuda" or "*" (any device)
    priority: ClassVar[int]  # auto picks the highest accepted; <= 0: only when named (reference: 0)
    tested: ClassVar[bool]  # False for paths never run on this project's machines (say so)

    @classmethod
    def unsupported(cls, qt: QTensor | Weight, device: torch.device) -> str | None:
        """Why this kernel cannot run ``qt`` on ``device``, or None when it can."""

    @classmethod
    def build(cls, qt: QTensor | Weight, bias: torch.Tensor | None, device: torch.device,
              dtype: torch.dtype) -> nn.Module:
        """A module computing ``x @ W.T + bias`` (W: the weight ``qt`` stands for), ``dtype`` activations."""


class KernelRegistry:
    """(op, format, backend) -> kernels, plus lookup by name.

    Kernel modules of ``modelpress.kernels`` (and plugins) register on first use, as every other
    registry's extensions do (:mod:`modelpress.core.plugins`).
    """

    def __init__(self) -> None:
        self._by_name: dict[str, type[Kernel]] = {}
        self._discovered = False

    def _discover(self) -> None:
        if not self._discovered:
            self._discovered = True
            from ..core.plugins import discover

            discover(("modelpress.kernels",))

    def register(self, cls: type[Kernel]) -> type[Kernel]:
        """Class decorator; a duplicate name is a programming error."""
        if cls.name in self._by_name and self._by_name[cls.name] is not cls:
            raise ValueError(f"kernel {cls.name!r} registered twice")
        self._by_name[cls.name] = cls
        return cls

    def get(self, name: str) -> type[Kernel]:
        if name not in self._by_name:
            self._discover()
        if name not in self._by_name:
            raise ModelpressError(f"unknown kernel {name!r}; registered: {', '.join(self.names())}")
        return self._by_name[name]

    def names(self) -> list[str]:
        self._discover()
        return sorted(self._by_name)

    def candidates(self, op: str, fmt: str, backend: str) -> list[type[Kernel]]:
        """Kernels registered for (op, format, backend), best first (wildcards included)."""
        self._discover()
        ks = [k for k in self._by_name.values() if k.op == op and k.priority > 0
              and ("*" in k.formats or fmt in k.formats) and k.backend in ("*", backend)]
        return sorted(ks, key=lambda k: -k.priority)

    def table(self) -> list[dict[str, object]]:
        """Rows (name, op, formats, backend, priority, tested) for docs and ``--kernel`` help."""
        self._discover()
        return [{"name": k.name, "op": k.op, "formats": list(k.formats), "backend": k.backend,
                 "priority": k.priority, "tested": k.tested} for k in self._by_name.values()]


KERNELS = KernelRegistry()


@dataclass(frozen=True)
class Choice:
    """The kernel picked for one weight, and a note when it is not the one asked for."""

    kernel: type[Kernel]
    note: str | None = None


_preferred: list[str] = []  # stack set by ``prefer_kernel``


@contextlib.contextmanager
def prefer_kernel(name: str) -> Iterator[None]:
    """Use kernel ``name`` (or ``auto`` / ``reference``) for installs inside this block."""
    if name not in (AUTO, REFERENCE):
        KERNELS.get(name)
    _preferred.append(name)
    try:
        yield
    finally:
        _preferred.pop()


def requested_kernel(prefer: str | None = None) -> str:
    """The kernel asked for: argument, else innermost ``prefer_kernel``, else $MODELPRESS_KERNEL, else auto."""
    name = prefer or (_preferred[-1] if _preferred else None) or os.environ.get(ENV_VAR) or AUTO
    if name not in (AUTO, REFERENCE):
        KERNELS.get(name)  # unknown names are a user error, not a silent fallback
    return name


def select_kernel(qt: QTensor | Weight, device: torch.device, prefer: str | None = None,
                  op: str = "linear") -> Choice:
    """Pick the kernel for ``qt`` on ``device`` (see module docstring for the order)."""
    name = requested_kernel(prefer)
    ref = KERNELS.get(REFERENCE)
    if name == REFERENCE:
        return Choice(ref)
    if name != AUTO:
        k = KERNELS.get(name)
        reason = _refusal(k, qt, device, op)
        return Choice(k) if reason is None else Choice(ref, f"kernel {name!r} requested but {reason}; using reference")
    reasons = []
    tag = format_tag(qt)
    for k in KERNELS.candidates(op, tag, device.type):
        reason = k.unsupported(qt, device)
        if reason is None:
            return Choice(k)
        reasons.append(f"{k.name}: {reason}")
    why = "; ".join(reasons) if reasons else f"no kernel for {tag} weights ({op}) on {device.type}"
    return Choice(ref, f"reference kernel ({why})")


def _refusal(k: type[Kernel], qt: QTensor | Weight, device: torch.device, op: str) -> str | None:
    if k.op not in ("*", op):
        return f"it computes {k.op}, not {op}"
    if "*" not in k.formats and format_tag(qt) not in k.formats:
        return f"it takes {'/'.join(k.formats)} weights, not {format_tag(qt)}"
    if k.backend not in ("*", device.type):
        return f"it needs a {k.backend} device and this one is {device.type}"
    return k.unsupported(qt, device)


@dataclass
class KernelPlan:
    """Per-layer kernel choices: rows of (layer name, kernel name, note or None)."""

    requested: str
    rows: list[tuple[str, str, str | None]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return dict(Counter(k for _, k, _ in self.rows))

    def notes(self) -> list[str]:
        """One line per distinct fallback reason, with how many layers and the first one's name."""
        by_reason: dict[str, list[str]] = {}
        for name, _, note in self.rows:
            if note:
                by_reason.setdefault(note, []).append(name)
        return [f"{len(v)} layer(s) (e.g. {v[0]}): {r}" for r, v in by_reason.items()]

    def to_dict(self) -> dict[str, object]:
        return {"requested": self.requested, "counts": self.counts(), "notes": self.notes()}
