"""Measured (not assumed) skipped work of activation-sparse MLPs.

While :func:`measure_mlp` is active, every MLP of the model (the module holding the ``gate_proj`` /
``up_proj`` / ``down_proj`` roles of the ArchSpec) counts the tokens it sees, and the sparse
wrappers inside it (``ThresholdLinear``, ``DejaVuMLP``) count the multiply-adds whose weights were
never needed for the inputs they actually received.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import torch.nn as nn

from ...core.errors import ModelpressError
from ...models.archspec import blocks_path, get_blocks
from ...models.layers import linear_shape, named_linears
from ...models.loading import LoadedModel

MLP_ROLES = ("gate_proj", "up_proj", "down_proj")


@dataclass
class MacReport:
    """Multiply-adds of the MLPs over one measured run.

    ``skipped_fraction``: skipped / dense; ``net_fraction`` also charges the predictors' cost.
    ``input_sparsity``: per wrapped-layer name suffix (``down_proj`` ...), measured zero fraction of inputs.
    """

    tokens: int = 0  # token passes through an MLP (tokens x MLP layers)
    dense_macs: int = 0
    skipped_macs: int = 0
    overhead_macs: int = 0
    input_sparsity: dict[str, float] = field(default_factory=dict)
    neuron_sparsity: float | None = None  # Deja Vu: fraction of MLP neurons not computed

    @property
    def skipped_fraction(self) -> float:
        return self.skipped_macs / self.dense_macs if self.dense_macs else 0.0

    @property
    def net_fraction(self) -> float:
        return (self.skipped_macs - self.overhead_macs) / self.dense_macs if self.dense_macs else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "skipped_fraction": self.skipped_fraction, "net_fraction": self.net_fraction}


def mlp_modules(lm: LoadedModel) -> list[tuple[str, nn.Module]]:
    """(name, module) of each block's MLP: the common parent of the spec's MLP roles."""
    if lm.spec is None or "down_proj" not in lm.spec.roles:
        raise ModelpressError("measuring MLP work needs an architecture with a down_proj role")
    rel = lm.spec.roles["down_proj"].rpartition(".")[0]
    prefix = blocks_path(lm.module, lm.spec)
    return [(f"{prefix}.{i}.{rel}", b.get_submodule(rel)) for i, b in enumerate(get_blocks(lm.module, lm.spec))]


def dense_macs_per_token(mlp: nn.Module) -> int:
    """in x out summed over the MLP's linear layers (a predictor's buffers are not layers)."""
    return sum(o * i for o, i in (linear_shape(m) for _, m in named_linears(mlp)))


def _counters(mlp: nn.Module) -> list[nn.Module]:
    return [m for m in mlp.modules() if hasattr(m, "reset_counters")]


@contextmanager
def measure_mlp(lm: LoadedModel) -> Iterator[MacReport]:
    """Count MLP work during the forwards run inside the ``with`` block; the report fills on exit.

    Example:
        >>> with measure_mlp(lm) as r:                      # doctest: +SKIP
        ...     perplexity(lm.module, ids, 1024)
        >>> r.skipped_fraction                              # doctest: +SKIP
    """
    report, handles = MacReport(), []
    mlps = mlp_modules(lm)
    for _, mlp in mlps:
        for m in _counters(mlp):
            m.reset_counters()
        per_tok = dense_macs_per_token(mlp)

        def count(_m: nn.Module, args: tuple, per_tok: int = per_tok) -> None:
            n = args[0].numel() // args[0].shape[-1]
            report.tokens += n
            report.dense_macs += n * per_tok

        handles.append(mlp.register_forward_pre_hook(count))
    try:
        yield report
    finally:
        for h in handles:
            h.remove()
        _collect(report, mlps)


def _collect(report: MacReport, mlps: list[tuple[str, nn.Module]]) -> None:
    zeros: dict[str, list[int]] = {}
    selected = neurons = 0
    for _, mlp in mlps:
        for name, m in mlp.named_modules():
            if not hasattr(m, "reset_counters"):
                continue
            report.skipped_macs += m.skipped_macs
            report.overhead_macs += getattr(m, "overhead_macs", 0)
            if hasattr(m, "zeros"):
                z = zeros.setdefault(name.rpartition(".")[2] or "mlp", [0, 0])
                z[0], z[1] = z[0] + m.zeros, z[1] + m.entries
            if hasattr(m, "selected"):
                selected, neurons = selected + m.selected, neurons + m.neurons
    report.input_sparsity = {k: z / e for k, (z, e) in zeros.items() if e}
    report.neuron_sparsity = 1 - selected / neurons if neurons else None
