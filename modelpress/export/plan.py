"""What an export does to each tensor, and what happens when a target cannot hold a layer.

Every writer walks the model's layers, asks its codec whether the target represents the layer's
format *exactly*, and records one :class:`TensorRecord` per weight: carried over losslessly,
near-lossless (codes kept, a derived parameter rounded), re-quantised (from our dequantised
weight), dequantised to float, cast (a float tensor to a narrower float) or copied unchanged.
A layer the target cannot hold is :class:`Unrepresentable`; the user's :class:`OnUnsupported`
choice decides whether the export refuses (listing every such layer and why), writes it
dequantised, or re-quantises it to the nearest thing the target holds.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import torch.nn as nn

from ..core.errors import ModelpressError
from ..core.outputs import EXPORT_REPORT, TEMP_MARKER
from ..quant.qlinear import QuantLinear

Action = Literal["lossless", "near-lossless", "requantized", "dequantized", "cast", "copied"]


class OnUnsupported(str, Enum):
    """What to do with a layer the target cannot represent (``--on-unsupported``)."""

    REFUSE = "refuse"          # stop, list the layers and why; nothing is written
    DEQUANTIZE = "dequantize"  # write the layer as a float weight
    REQUANTIZE = "requantize"  # quantise the dequantised weight to a grid the target has


class Unrepresentable(Exception):
    """Raised by a codec: the target has no exact encoding for this layer (``reason`` says why)."""


@dataclass
class TensorRecord:
    """One exported weight: where it came from, what it became, and how."""

    name: str
    source: str  # our format, e.g. "int4 sym g64", or "float32"
    target: str  # e.g. "pack-quantized int4 g64", "Q4_0", "F16"
    action: Action
    detail: str = ""


@dataclass
class ExportReport:
    """Per-tensor record of an export, written beside the output as JSON."""

    format: str
    output: str
    tensors: list[TensorRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, name: str, source: str, target: str, action: Action, detail: str = "") -> None:
        self.tensors.append(TensorRecord(name, source, target, action, detail))

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.action] = out.get(t.action, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "output": self.output, "counts": self.counts(), "notes": self.notes,
                "tensors": [asdict(t) for t in self.tensors]}

    def write(self, path: Path) -> None:
        """Write the report; inside an output folder it also lists the folder's files (ownership:
        a later ``--overwrite`` replaces the folder only if it holds nothing else)."""
        data = self.to_dict()
        if path.name == EXPORT_REPORT:
            data["files"] = sorted(p.name for p in path.parent.iterdir()
                                   if p.is_file() and p.name not in (EXPORT_REPORT, TEMP_MARKER))
        path.write_text(json.dumps(data, indent=2))

    def summary(self) -> str:
        """One line: counts per action, and the re-quantised / dequantised tensors by name (first few)."""
        c = self.counts()
        parts = [f"{n} {a}" for a, n in sorted(c.items())]
        changed = [t.name for t in self.tensors if t.action in ("requantized", "dequantized")]
        tail = f"; re-quantised/dequantised: {', '.join(changed[:6])}{' ...' if len(changed) > 6 else ''}" if changed else ""
        return f"{self.format}: {', '.join(parts)}{tail}"


def describe_format(m: nn.Module) -> str:
    """Short human description of a layer's storage (``int4 sym g64``, ``fp8 e4m3 channel``, ``float32``)."""
    if isinstance(m, QuantLinear):
        f = m.fmt.to_dict()
        gran = f.get("granularity", {})
        g = {"group": f"g{gran.get('size')}", "channel": "channel", "tensor": "tensor"}.get(gran.get("kind"), "")
        if f["type"] == "int":
            return f"int{f['bits']} {'sym' if f.get('symmetric', True) else 'asym'} {g}"
        if f["type"] == "fp8":
            return f"fp8 {f.get('variant')} {g}"
        return f"{f['type']} {g}".strip()
    tag = getattr(m, "layer_tag", None)
    if tag:
        return tag
    w = getattr(m, "weight", None)
    return str(w.dtype).replace("torch.", "") if w is not None else type(m).__name__


def dense_weight(m: nn.Module, name: str) -> "torch.Tensor":  # noqa: F821
    """The float (out, in) weight a layer stands for; a compressed layer class without a way to
    dequantise cannot be exported (one-line error naming it)."""
    if isinstance(m, QuantLinear):
        return m.dequantized_weight()
    fn = getattr(m, "dequantized_weight", None) or getattr(m, "effective_weight", None)  # sparse: weight * mask
    if callable(fn):
        return fn().detach()
    w = getattr(m, "weight", None)
    if w is None or getattr(m, "layer_tag", None):
        raise ModelpressError(f"{name}: compressed layer {getattr(m, 'layer_tag', type(m).__name__)!r} has no "
                              "dequantised weight to export")
    return w.detach()


def refuse_if_any(problems: list[tuple[str, str]], target: str, policy: OnUnsupported) -> None:
    """With ``refuse``, one error listing each layer the target cannot represent and why."""
    if problems and policy == OnUnsupported.REFUSE:
        listed = "; ".join(f"{n}: {why}" for n, why in problems[:8])
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise ModelpressError(f"{target} cannot represent {len(problems)} layer(s): {listed}{more}. "
                              "Choose --on-unsupported dequantize or requantize to export anyway")
