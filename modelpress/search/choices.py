"""What a layer may be given: a bit width, a sparsity or a rank, as typed choices.

A choice knows the three things the sensitivity analysis and the allocator need, and nothing
about models: how it changes one weight given its calibration Hessian (``perturb``), what that
costs (stored bytes, weights kept), and the ordinary recipe stage that applies it to named layers
(``stage``), so an allocation is emitted as a recipe any ``modelpress compress`` runs.

Example:
    >>> c = QuantChoice(bits=3)
    >>> c.label, c.stage(["model.layers.0.mlp.down_proj"])["format"]["bits"]
    ('w3g64', 3)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal, Union

import torch

from ..quant.formats import IntFormat
from ..quant.granularity import PerGroup


@dataclass(frozen=True)
class Perturbed:
    """A choice applied to one weight: the dense result (out, in), its stored bytes, weights kept."""

    W: torch.Tensor
    nbytes: int
    kept: int


@dataclass(frozen=True)
class QuantChoice:
    """``bits``-bit symmetric integer weights in groups of ``group``, by GPTQ or RTN.

    Bytes are the format's own packed codes plus scales (``QTensor.nbytes``, what the report's
    bits per weight count), so a byte budget matches the saved size of the quantised layers.
    """

    family: ClassVar[str] = "quant"
    bits: int
    group: int = 64
    algorithm: Literal["gptq", "rtn"] = "gptq"

    @property
    def label(self) -> str:
        return f"w{self.bits}g{self.group}"

    def format(self) -> IntFormat:
        return IntFormat(bits=self.bits, symmetric=True, granularity=PerGroup(size=self.group))

    def perturb(self, W: torch.Tensor, H: torch.Tensor) -> Perturbed:
        """W (out, in), H (in, in) = 2/n X^T X."""
        fmt = self.format()
        if self.algorithm == "rtn":
            qt = fmt.quantize(W)
            return Perturbed(qt.dequantize(), qt.nbytes(), W.numel())
        from ..quant.algos.gptq.gptq import gptq_quantize

        res = gptq_quantize(W.clone(), H.clone(), fmt, act_order=True)
        return Perturbed(res.Q, res.qtensor.nbytes(), W.numel())

    def nbytes(self, shape: tuple[int, int]) -> int:
        """Stored bytes of an (out, in) weight in this format (independent of the values)."""
        return self.format().quantize(torch.ones(shape)).nbytes()

    def stage(self, targets: list[str]) -> dict[str, Any]:
        fmt = {"type": "int", "bits": self.bits, "symmetric": True, "granularity": self.group}
        if self.algorithm == "rtn":
            return {"method": "rtn", "targets": targets, "format": fmt}
        return {"method": "gptq", "targets": targets, "act_order": True, "true_sequential": True,
                "dampening_frac": 0.01, "format": fmt}


@dataclass(frozen=True)
class SparsityChoice:
    """Unstructured pruning of a fraction ``sparsity`` of the weights, by SparseGPT or Wanda.

    Bytes follow the bitmask storage of pruned layers: one bit per weight plus the kept fp32 values.
    """

    family: ClassVar[str] = "sparsity"
    sparsity: float
    algorithm: Literal["sparsegpt", "wanda"] = "sparsegpt"

    @property
    def label(self) -> str:
        return f"s{round(100 * self.sparsity):d}"

    def perturb(self, W: torch.Tensor, H: torch.Tensor) -> Perturbed:
        from ..sparsity.patterns import Unstructured

        if self.algorithm == "wanda":
            from ..sparsity.algos.wanda.wanda import wanda_mask

            # ||X_j||_2 is sqrt(n/2 * H_jj): the per-channel scale does not change the ranking
            Wp = W * wanda_mask(W, H.diagonal().clamp_min(0).sqrt(), Unstructured(), self.sparsity)
        else:
            from ..sparsity.algos.sparsegpt.sparsegpt import sparsegpt_prune

            Wp = sparsegpt_prune(W.clone(), H.clone(), Unstructured(), self.sparsity).W
        kept = int((Wp != 0).sum())
        return Perturbed(Wp, (W.numel() + 7) // 8 + 4 * kept, kept)

    def stage(self, targets: list[str]) -> dict[str, Any]:
        return {"method": self.algorithm, "targets": targets, "pattern": "unstructured", "sparsity": self.sparsity}


@dataclass(frozen=True)
class RankChoice:
    """Factorisation to rank ``rank`` by SVD-LLM (whitened by the calibration Gram), fp32 factors."""

    family: ClassVar[str] = "rank"
    rank: int

    @property
    def label(self) -> str:
        return f"r{self.rank}"

    def perturb(self, W: torch.Tensor, H: torch.Tensor) -> Perturbed:
        from ..lowrank.factor import whitened_factor

        f = whitened_factor(W, H, min(self.rank, *W.shape), damp=0.01)
        kept = f.rank * (W.shape[0] + W.shape[1])
        return Perturbed(f.B @ f.A, 4 * kept, kept)

    def stage(self, targets: list[str]) -> dict[str, Any]:
        return {"method": "svdllm", "targets": targets, "rank": self.rank}


Choice = Union[QuantChoice, SparsityChoice, RankChoice]
_FAMILIES: dict[str, type] = {c.family: c for c in (QuantChoice, SparsityChoice, RankChoice)}


def choice_to_dict(c: Choice) -> dict[str, Any]:
    """``{"family": "quant", "bits": 3, ...}`` (the JSON form of the sensitivity table)."""
    return {"family": c.family, **asdict(c)}


def choice_from_dict(d: dict[str, Any]) -> Choice:
    d = dict(d)
    return _FAMILIES[d.pop("family")](**d)
