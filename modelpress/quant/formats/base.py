"""The contract every weight format implements, and the packed container ``QTensor``.

A format is a frozen config with three elementwise operations on a *grouped* view of a weight
(rows, n_groups, G):

* ``fit(w)``      -> parameters broadcastable to (rows, n_groups, 1) (scale, zero, ...)
* ``encode(w, p)``-> uint8 codes in [0, 2**code_bits), same shape as ``w``
* ``decode(c, p)``-> float values

Parameters are stored once, structurally. Some span the whole tensor (NVFP4's global scale,
the offset and second-level scales of double-quantised NF4): a format fits those once, up front,
with ``fit_tensor``, and every per-group fit after that (``fit_groups``, called by GPTQ as its
column loop reaches a group) rounds against them, so what is stored is exactly what the algorithm
optimised. :class:`FitPlan` carries that pair through an algorithm::

    plan = fmt.plan(fmt.grouped(W))          # tensor-wide parameters, once
    p = plan.fit(W_group, first_group=g)     # (rows, k, 1), already at stored precision
    stored = plan.store(all_params)          # what the file holds

Capabilities are attributes, not tests on ``type``: ``row_wise`` (rows can be split and stacked),
``tensor_wide`` (some parameter spans the tensor), ``scale_linear`` (the dequantised value is
linear in the ``scale`` parameter, what a learnable step size needs), and every format offers
``fake_quantize_ste`` (rounding with a straight-through gradient).
Algorithms (RTN, GPTQ, AWQ ...) only use this contract, so a new format works with every algorithm.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ...core.config import Config, Registry
from ...core.errors import ModelpressError
from ..granularity import Granularity, PerChannel, PerGroup, PerTensor, group_layout
from ..packing import pack_codes, packed_nbytes, unpack_codes

Params = dict[str, torch.Tensor]

#: ``type`` tag -> format class. Each format module registers itself.
FORMATS: Registry[type["WeightFormat"]] = Registry("format", packages=("modelpress.quant.formats",))


class WeightFormat(Config, ABC):
    """Base class of weight formats (see module docstring for the contract)."""

    #: Bits of one packed code (4 for int4/NF4/FP4, 8 for int8/FP8 ...).
    code_bits: ClassVar[int]
    #: The dequantised value is ``scale * f(code, other params)``: a learnable step size (LSQ) and
    #: scale folding act on ``params["scale"]`` linearly.
    scale_linear: ClassVar[bool] = True

    granularity: Granularity = PerChannel()

    # ---- capabilities --------------------------------------------------------------------------
    @property
    def tensor_wide(self) -> bool:
        """Some parameter spans the whole tensor (fitted once by ``fit_tensor``)."""
        return False

    @property
    def exact_zero(self) -> bool:
        """Zero is a representable value (joint pruning + quantisation stores pruned weights as 0)."""
        return True

    @property
    def row_wise(self) -> bool:
        """Every parameter belongs to one row, so rows can be split or stacked (GPTQ stacks q/k/v)."""
        return not self.tensor_wide and not isinstance(self.granularity, PerTensor)

    # ---- the three elementwise operations -------------------------------------------------
    @abstractmethod
    def fit(self, w: torch.Tensor) -> Params:
        """Parameters for ``w`` of shape (rows, n_groups, G), each broadcastable to (rows, n_groups, 1)."""

    @abstractmethod
    def encode(self, w: torch.Tensor, params: Params) -> torch.Tensor:
        """uint8 codes of ``w`` under ``params`` (round to nearest representable value)."""

    @abstractmethod
    def decode(self, codes: torch.Tensor, params: Params) -> torch.Tensor:
        """Float32 values of ``codes`` under ``params``."""

    # ---- tensor-wide parameters, then groups --------------------------------------------------
    def fit_tensor(self, w: torch.Tensor) -> Params:
        """Parameters spanning the whole grouped weight ``w`` (rows, n_groups, G), fitted once
        before any per-group work; stored as they are. Default: none."""
        return {}

    def fit_groups(self, w: torch.Tensor, tensor: Params, first_group: int = 0) -> Params:
        """Parameters of the groups ``w`` (rows, k, G) (groups ``first_group ..`` of the tensor),
        fitted under the tensor-wide ``tensor`` and rounded to exactly what will be stored.

        Default, for formats without tensor-wide parameters: ``fit`` then the stored rounding."""
        return self.roundtrip_params(self.fit(w))

    def store(self, params: Params, tensor: Params) -> Params:
        """What the file holds for compute parameters ``params`` (rows, n_groups, 1) fitted by
        ``fit_groups`` under ``tensor``. Default: ``store_params`` (no tensor-wide parameters)."""
        return self.store_params(params)

    def plan(self, w: torch.Tensor) -> "FitPlan":
        """A :class:`FitPlan` for the grouped weight ``w`` (rows, n_groups, G)."""
        return FitPlan(self, self.fit_tensor(w))

    # ---- parameter storage -----------------------------------------------------------------
    def store_params(self, params: Params) -> Params:
        """Parameters as stored on disk, shape (rows, n_groups) (default: scale as fp16)."""
        out = {}
        for k, v in params.items():
            v = v.squeeze(-1)
            out[k] = v.to(torch.float16) if k == "scale" else v
        return out

    def load_params(self, stored: Params) -> Params:
        """Inverse of ``store_params`` back to float32 compute parameters, shape (rows, n_groups, 1)."""
        return {k: v.to(torch.float32).unsqueeze(-1) if v.is_floating_point() else v.unsqueeze(-1)
                for k, v in stored.items()}

    def roundtrip_params(self, params: Params) -> Params:
        """Parameters rounded to their stored precision, so encoding uses exactly what is saved.

        Store *fitted* parameters once and keep that result: ``store_params`` need not be
        idempotent (NF4 double quantisation re-centres the absmax on every call), so storing the
        output of this method again may not give back the same tensors.
        """
        return self.load_params(self.store_params(params))

    # ---- whole-tensor helpers built on the contract ------------------------------------------
    def group_size(self, in_features: int) -> int:
        """Columns per group for a weight with ``in_features`` inputs (per-tensor handled apart)."""
        return self.granularity.size if isinstance(self.granularity, PerGroup) else in_features

    def grouped(self, w: torch.Tensor) -> torch.Tensor:
        """View (out, in) as (rows, n_groups, G); a short last group is zero padded.

        Zero padding never changes a symmetric absmax, and asymmetric grids always contain zero.
        """
        out_f, in_f = w.shape
        if isinstance(self.granularity, PerTensor):
            return w.reshape(1, 1, out_f * in_f)
        g = self.group_size(in_f)
        n, _ = group_layout(in_f, g)
        if n * g != in_f:
            w = torch.nn.functional.pad(w, (0, n * g - in_f))
        return w.reshape(out_f, n, g)

    def quantize(self, w: torch.Tensor, params: Params | None = None, stored: Params | None = None) -> "QTensor":
        """Round-to-nearest quantisation of a 2-D weight (out, in); on the grid of ``stored``
        parameters when given (kept as they are: a trained fake-quantised layer packed back),
        else of compute ``params`` when given (stored first), else fitted here."""
        if w.dim() != 2:
            raise ModelpressError(f"{self.type} expects a 2-D weight, got shape {tuple(w.shape)}")
        wf = w.detach().to(torch.float32)
        wg = self.grouped(wf)
        if stored is not None:
            pass
        elif params is None:  # tensor-wide parameters first, then every group under them
            plan = self.plan(wg)
            stored = plan.store(plan.fit(wg))
        else:  # parameters the caller fitted (e.g. HQQ's optimised zero points)
            stored = self.store_params(params)
        codes = self.encode(wg, self.load_params(stored))
        codes = codes.reshape(codes.shape[0], -1) if not isinstance(self.granularity, PerTensor) \
            else codes.reshape(w.shape[0], -1)
        codes = codes[:, : w.shape[1]].contiguous()
        return QTensor(self, tuple(w.shape), codes, stored)

    def fake_quantize(self, w: torch.Tensor) -> torch.Tensor:
        """Quantise then dequantise (same dtype as ``w``)."""
        return self.quantize(w).dequantize().to(w.dtype)

    def fake_quantize_ste(self, w: torch.Tensor, params: Params | None = None) -> torch.Tensor:
        """Quantise-dequantise in the forward pass, identity in the backward pass (straight-through
        estimator), for quantisation-aware training; ``params`` (compute form, (rows, n_groups, 1))
        are fitted when not given."""
        wg = self.grouped(w.float())
        if params is None:
            plan = self.plan(wg.detach())
            params = plan.fit(wg.detach())
        q = self.decode(self.encode(wg.detach(), params), params)
        q = q.reshape(q.shape[0], -1) if not isinstance(self.granularity, PerTensor) else q.reshape(w.shape[0], -1)
        q = q[:, : w.shape[1]].to(w.dtype)
        return q + (w - w.detach())  # exactly q forward (w + (q - w) can miss it by an ulp), gradient 1

    @property
    def type_tag(self) -> str:
        return self.type  # type: ignore[attr-defined]


@dataclass
class QTensor:
    """A quantised 2-D weight: unpacked uint8 codes plus stored parameters.

    ``to_tensors`` gives what is saved (packed codes + parameters); ``from_tensors`` reads it back.
    """

    fmt: WeightFormat
    shape: tuple[int, int]
    codes: torch.Tensor  # (out, in) uint8
    params: Params = field(default_factory=dict)  # stored precision, (rows, n_groups)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Float weight of shape ``shape``."""
        out_f, in_f = self.shape
        p = self.fmt.load_params(self.params)
        if isinstance(self.fmt.granularity, PerTensor):
            vals = self.fmt.decode(self.codes.reshape(1, 1, -1), p)
            return vals.reshape(out_f, in_f).to(dtype)
        g = self.fmt.group_size(in_f)
        n, _ = group_layout(in_f, g)
        c = self.codes
        if n * g != in_f:
            c = torch.nn.functional.pad(c, (0, n * g - in_f))
        vals = self.fmt.decode(c.reshape(out_f, n, g), p).reshape(out_f, n * g)
        return vals[:, :in_f].to(dtype)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors to save: ``qweight`` (packed codes) and the stored parameters."""
        return {"qweight": pack_codes(self.codes, self.fmt.code_bits), **self.params}

    @classmethod
    def from_tensors(cls, fmt: WeightFormat, shape: tuple[int, int], tensors: dict[str, torch.Tensor]) -> "QTensor":
        codes = unpack_codes(tensors["qweight"], fmt.code_bits, shape[1])
        params = {k: v for k, v in tensors.items() if k != "qweight"}
        return cls(fmt, tuple(shape), codes, params)

    def nbytes(self) -> int:
        """Bytes really stored (packed codes + every parameter tensor), computed without packing."""
        codes = self.codes.shape[0] * packed_nbytes(self.codes.shape[1], self.fmt.code_bits)
        return codes + sum(t.numel() * t.element_size() for t in self.params.values())

    def take_rows(self, a: int, b: int) -> "QTensor":
        """Rows ``a:b`` (only meaningful when :func:`row_wise` holds for the format)."""
        return QTensor(self.fmt, (b - a, self.shape[1]), self.codes[a:b].contiguous(),
                       {k: v[a:b].contiguous() for k, v in self.params.items()})

    @classmethod
    def stack_rows(cls, parts: "list[QTensor]") -> "QTensor":
        """Row-wise concatenation of same-format, same-width tensors (inverse of :meth:`take_rows`)."""
        fmt, cols = parts[0].fmt, parts[0].shape[1]
        if not row_wise(fmt) or any(p.fmt != fmt or p.shape[1] != cols for p in parts):
            raise ModelpressError("stack_rows needs row-wise tensors of one format and width")
        return cls(fmt, (sum(p.shape[0] for p in parts), cols), torch.cat([p.codes for p in parts]),
                   {k: torch.cat([p.params[k] for p in parts]) for k in parts[0].params})

    def bits_per_weight(self) -> float:
        """True bits per weight including scales and zero points."""
        return 8.0 * self.nbytes() / (self.shape[0] * self.shape[1])


@dataclass
class FitPlan:
    """Tensor-wide parameters fitted once, and the per-group fits and storage that use them.

    Example:
        >>> from modelpress.quant.formats.nf4 import NF4Format
        >>> fmt, W = NF4Format(granularity=PerGroup(size=64)), torch.randn(8, 256)
        >>> plan = fmt.plan(fmt.grouped(W))
        >>> p = {"absmax": torch.cat([plan.fit(fmt.grouped(W)[:, g:g + 1], first_group=g)["absmax"] for g in range(4)], 1)}
        >>> torch.equal(fmt.load_params(plan.store(p))["absmax"], p["absmax"])  # stored == used
        True
    """

    fmt: "WeightFormat"
    tensor: Params

    def fit(self, w: torch.Tensor, first_group: int = 0) -> Params:
        """Compute parameters of the groups ``w`` (rows, k, G), at stored precision."""
        return self.fmt.fit_groups(w, self.tensor, first_group)

    def store(self, params: Params) -> Params:
        """The stored tensors for all groups' compute parameters (rows, n_groups, 1)."""
        return self.fmt.store(params, self.tensor)


def format_from_dict(data: dict[str, Any]) -> WeightFormat:
    """Build a registered format from ``{"type": ..., ...}``."""
    cls = FORMATS.get(str(data.get("type")))
    return cls.model_validate(data)


def row_wise(fmt: WeightFormat) -> bool:
    """Every parameter of ``fmt`` belongs to one row (see :attr:`WeightFormat.row_wise`)."""
    return fmt.row_wise
