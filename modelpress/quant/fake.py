"""Training through a quantised layer: its fake-quantised float form, and back to the packed layer.

A :class:`~modelpress.quant.qlinear.QuantLinear` holds codes, which gradients cannot move. For
training (recovery fine-tuning, distillation into a quantised student) each one is swapped for a
:class:`FakeQuantLinear`: a float weight started at the dequantised weight, used in the forward pass
through the format's quantise-dequantise with a straight-through gradient, on the layer's own grid
(its stored scales and zero points stay fixed). Converting back rounds the trained weight on that
same grid, so the packed layer computes exactly what the fake-quantised layer computed.

:class:`LearnedGridLinear` goes further for integer grids (``int``, ``int_fz``): the step sizes and
zero points are trained too, with the straight-through gradients of LSQ (Esser et al., 2020) and
LSQ+ (Bhalgat et al., 2020), each scaled by LSQ's ``g = 1 / sqrt(G * qmax)``. Its forward value is
always the format's own encode-decode at the *stored* precision of the current scale and zero, so
packing it is exact as well. With :meth:`LearnedGridLinear.freeze_codes` the weights stay on their
codes and only the scales move (EfficientQAT's end-to-end stage).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.errors import ModelpressError
from .formats.base import Params, QTensor, WeightFormat
from .formats.int_fz import FloatZeroIntFormat
from .formats.integer import IntegerGrid
from .granularity import PerTensor
from .qlinear import QuantLinear


class FakeQuantLinear(nn.Module):
    """A trainable float weight seen through a fixed quantisation grid (straight-through gradient).

    Example:
        >>> from modelpress.quant.formats import IntFormat
        >>> q = QuantLinear.from_linear_weight(IntFormat(bits=4).quantize(torch.randn(8, 64)), None)
        >>> f = FakeQuantLinear.from_quant(q)
        >>> x = torch.randn(2, 64)
        >>> torch.equal(f(x), q(x)), torch.equal(f.to_quant()(x), q(x))
        (True, True)
    """

    def __init__(self, fmt: WeightFormat, weight: torch.Tensor, stored: Params, bias: torch.Tensor | None,
                 mask: torch.Tensor | None = None) -> None:
        super().__init__()
        self.fmt = fmt
        # fixed: the grid the packed layer has, stored and compute forms (buffers: they follow .to())
        for prefix, ps in (("stored_", stored), ("params_", fmt.load_params(stored))):
            for k, v in ps.items():
                self.register_buffer(prefix + k, v, persistent=False)
        self._stored_keys, self._param_keys = tuple(stored), tuple(fmt.load_params(stored))
        self.weight = nn.Parameter(weight.detach().to(torch.float32).clone())
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad) if bias is not None else None
        # a pruned layer's mask (True = kept): pruned weights enter the grid as exactly 0, whatever training writes
        self.register_buffer("mask", mask.to(torch.bool) if mask is not None else None, persistent=False)
        # an input quantiser (modelpress.quant.fake_act.ActFakeQuant) when activations are trained quantised too
        self.register_module("act", None)

    def masked_weight(self) -> torch.Tensor:
        """The float weight with pruned entries at exactly 0 (zero gradient there)."""
        return self.weight if self.mask is None else self.weight.masked_fill(~self.mask, 0)

    @property
    def stored(self) -> Params:
        return {k: getattr(self, "stored_" + k) for k in self._stored_keys}

    @property
    def params(self) -> Params:
        return {k: getattr(self, "params_" + k) for k in self._param_keys}

    @classmethod
    def from_quant(cls, q: QuantLinear) -> "FakeQuantLinear":
        qt = q.qtensor()
        return cls(q.fmt, qt.dequantize(torch.float32), qt.params, q.bias)

    def quantized_weight(self) -> torch.Tensor:
        """The weight the forward pass uses (on the grid; gradient straight through to ``weight``)."""
        return self.fmt.fake_quantize_ste(self.masked_weight(), self.params)

    def grid_codes(self) -> tuple[torch.Tensor, Params]:
        """The codes (rows, n_groups, G) and compute parameters the forward pass uses now."""
        p = self.params
        return self.fmt.encode(self.fmt.grouped(self.masked_weight().detach()), p), p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:  # input fake-quantised too: the quantiser owns that arithmetic
            return self.act.linear(x, self)
        w = self.quantized_weight().to(x.dtype)
        return F.linear(x, w, self.bias.to(x.dtype) if self.bias is not None else None)

    def to_quant(self) -> QuantLinear:
        """The packed layer holding exactly the grid point the forward pass used for every weight
        (with an input quantiser: the W8A8 layer, see ``ActFakeQuant.pack``)."""
        if self.act is not None:
            return self.act.pack(self)
        qt: QTensor = self.fmt.quantize(self.masked_weight().detach(), stored=self.stored)
        return QuantLinear.from_linear_weight(qt, self.bias)


def learnable_grid(fmt: WeightFormat) -> bool:
    """Whether LSQ can train ``fmt``'s grid: an integer grid (codes ``0..qmax``, value ``(code - zero) * scale``)
    whose parameters sit on rows (not one scale across the tensor)."""
    return isinstance(fmt, IntegerGrid) and fmt.scale_linear and not isinstance(fmt.granularity, PerTensor)


def fake_quant_problem(fmt: WeightFormat) -> str | None:
    """Why ``fmt`` cannot be trained through (None when it can): its ``fake_quantize_ste`` must run,
    give the format's own quantise-dequantise forward, and pass a finite, non-zero gradient back.

    Checked on a small seeded weight (two groups wide), so a recipe is refused when it is loaded.

    Example:
        >>> from modelpress.quant.formats import NF4Format
        >>> fake_quant_problem(NF4Format()) is None
        True
    """
    g = fmt.granularity
    cols = 2 * g.size if hasattr(g, "size") else 64
    w = torch.randn(4, cols, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    try:
        out = fmt.fake_quantize_ste(w)
        if not torch.equal(out.detach(), fmt.fake_quantize(w.detach())):
            return "its fake quantisation differs from its quantise-dequantise"
        if not out.requires_grad:
            return "its fake quantisation passes no gradient back"
        (grad,) = torch.autograd.grad(out.sum(), w)
    except Exception as e:  # noqa: BLE001 (a plugin format may fail in any way; the recipe is refused)
        return f"its fake quantisation fails ({type(e).__name__}: {e})"
    if not bool(torch.isfinite(grad).all()) or not bool(grad.abs().sum() > 0):
        return "its fake-quantisation gradient is zero or not finite"
    return None


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """``x`` forward (exactly: no rounding of ``x - x*g + x*g``), its gradient multiplied by ``g``
    backward (LSQ's step-size gradient scale)."""
    xg = x * g
    return x.detach() + (xg - xg.detach())


def lsq_fake_quant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | float, qmax: int,
                   g: float) -> torch.Tensor:
    """LSQ / LSQ+ fake quantisation of grouped weights, ``(clamp(round(w / s + z), 0, qmax) - z) * s``.

    Rounding is straight-through, so inside the range ``d/dw = 1``, ``d/ds = round(w/s + z) - z - w/s``
    and ``d/dz = 0``; clipped to a bound ``b``: ``d/dw = 0``, ``d/ds = b - z``, ``d/dz = -s`` (LSQ's
    step gradient, LSQ+'s offset gradient in code units). The gradients of ``s`` and ``z`` are scaled
    by ``g``.

    Args:
        w: (rows, n_groups, G) weights. scale, zero: (rows, n_groups, 1) (zero may be a constant).
        qmax: the top code. g: the gradient scale, ``1 / sqrt(G * qmax)`` in LSQ.

    Example:
        >>> s = torch.tensor([[[0.5]]], requires_grad=True)
        >>> lsq_fake_quant(torch.tensor([[[0.3, 2.0]]]), s, 2.0, 3, 1.0).sum().backward()
        >>> s.grad  # (1 - 0.6) + (3 - 2): in range, then clipped
        tensor([[[1.4000]]])
    """
    s = grad_scale(scale, g)
    z = grad_scale(zero, g) if torch.is_tensor(zero) else zero
    codes = torch.clamp(round_ste(w / s + z), 0, qmax)  # (rows, n_groups, G)
    return (codes - z) * s


#: The smallest step size a learned grid may take (a float16 subnormal, far below any real weight's step).
_MIN_STEP = 1e-6


class LearnedGridLinear(FakeQuantLinear):
    """A FakeQuantLinear on an integer grid whose scales (and zero points) are parameters too (LSQ / LSQ+).

    ``scale`` (the step size as a multiple of its start) and ``zero`` (in codes) are (rows, n_groups, 1)
    parameters; :meth:`step_size` is the step they give. The forward pass uses them
    rounded to what the format stores (an ``int`` zero point to an integer in ``0..qmax``, a float16
    scale to float16), through the format's own encode-decode, so :meth:`to_quant` packs exactly the
    computed weight; the gradients are LSQ's (:func:`lsq_fake_quant`).

    Example:
        >>> from modelpress.quant.formats import IntFormat
        >>> q = QuantLinear.from_linear_weight(IntFormat(bits=3, granularity=32, symmetric=False).quantize(torch.randn(8, 64)), None)
        >>> f = LearnedGridLinear.from_quant(q)
        >>> x = torch.randn(2, 64)
        >>> torch.equal(f(x), q(x)), sorted(n for n, _ in f.named_parameters())
        (True, ['scale', 'weight', 'zero'])
    """

    def __init__(self, fmt: WeightFormat, weight: torch.Tensor, stored: Params, bias: torch.Tensor | None,
                 mask: torch.Tensor | None = None, learn_zero: bool = True) -> None:
        if not learnable_grid(fmt):
            raise ModelpressError(f"format {fmt.to_dict()} has no learnable step size (an integer grid with "
                                  "per-channel or per-group scales is needed)")
        super().__init__(fmt, weight, stored, bias, mask)
        p = self.params
        # the step size is trained as a multiple of its start, ``s = scale * s0``: an optimizer step then
        # changes it by the same *fraction* at 2 bits as at 8 (whose steps are 100x smaller)
        self.register_buffer("s0", p["scale"].clone(), persistent=False)  # (rows, n_groups, 1)
        self.scale = nn.Parameter(torch.ones_like(p["scale"]))
        self.zero = nn.Parameter(p["zero"].to(torch.float32), requires_grad=learn_zero) if "zero" in p else None
        self.register_buffer("codes", None, persistent=False)  # set by freeze_codes
        self.g = 1.0 / math.sqrt(fmt.group_size(weight.shape[1]) * fmt.qmax)

    @classmethod
    def from_quant(cls, q: QuantLinear, mask: torch.Tensor | None = None, learn_zero: bool = True) -> "LearnedGridLinear":
        qt = q.qtensor()
        return cls(q.fmt, qt.dequantize(torch.float32), qt.params, q.bias, mask, learn_zero)

    def step_size(self) -> torch.Tensor:
        """The step sizes the forward pass uses now, (rows, n_groups, 1) (stored precision)."""
        return self.grid()[0].detach()

    def grid(self) -> tuple[torch.Tensor, torch.Tensor | float]:
        """(scale, zero) at stored precision forward, straight-through backward; zero is the
        symmetric grid's fixed centre when there is no zero point."""
        s = (self.scale * self.s0).clamp_min(_MIN_STEP)  # a step trained to 0 or below would divide by 0
        z: torch.Tensor | float
        if self.zero is None:
            z = float(self.fmt.mid)  # symmetric: codes centred on 2**(bits-1)
        elif isinstance(self.fmt, FloatZeroIntFormat):
            z = self.zero
        else:  # an integer zero point
            z = torch.clamp(round_ste(self.zero), 0, self.fmt.qmax)
        stored = self.fmt.roundtrip_params({"scale": s.detach(), **({"zero": z.detach()} if torch.is_tensor(z) else {})})
        s = s + (stored["scale"] - s).detach()
        if torch.is_tensor(z):
            z = z + (stored["zero"].to(torch.float32) - z).detach()
        return s, z

    def grid_codes(self) -> tuple[torch.Tensor, Params]:
        """The codes (rows, n_groups, G) and compute parameters the forward pass uses now."""
        p = self._compute_params()
        if self.codes is not None:
            return self.codes, p
        return self.fmt.encode(self.fmt.grouped(self.masked_weight().detach()), p), p

    def _compute_params(self) -> Params:
        s, z = self.grid()
        return {"scale": s.detach(), **({"zero": z.detach()} if torch.is_tensor(z) else {})}

    def quantized_weight(self) -> torch.Tensor:
        """The format's encode-decode of the weight on the current grid, with LSQ's gradients."""
        w = self.masked_weight()
        wg = self.fmt.grouped(w)  # (rows, n_groups, G)
        s, z = self.grid()
        p = self._compute_params()
        if self.codes is not None:  # frozen codes: only the grid moves, d/ds = code - z
            exact = self.fmt.decode(self.codes, p)
            surrogate = (self.codes.to(torch.float32) - z) * s
        else:
            exact = self.fmt.decode(self.fmt.encode(wg.detach(), p), p)
            surrogate = lsq_fake_quant(wg, s, z, self.fmt.qmax, self.g)
        q = exact + (surrogate - surrogate.detach())  # exactly the format's value forward
        return q.reshape(q.shape[0], -1)[:, : w.shape[1]]

    @torch.no_grad()
    def freeze_codes(self) -> None:
        """Fix every weight on its current code; from now on only the grid (scale, zero) trains."""
        self.codes = self.fmt.encode(self.fmt.grouped(self.masked_weight().detach()), self._compute_params())
        self.weight.requires_grad_(False)

    def to_quant(self) -> QuantLinear:
        """The packed layer on the current (stored-precision) grid, holding the codes the forward used."""
        if self.act is not None:
            return self.act.pack(self)
        stored = self.fmt.store_params(self._compute_params())
        if self.codes is None:
            return QuantLinear.from_linear_weight(self.fmt.quantize(self.masked_weight().detach(), stored=stored), self.bias)
        out_f, in_f = self.weight.shape
        codes = self.codes.reshape(out_f, -1)[:, :in_f].contiguous()
        return QuantLinear.from_linear_weight(QTensor(self.fmt, (out_f, in_f), codes, stored), self.bias)


def _swap(model: nn.Module, kind: type, convert: Callable[[nn.Module], nn.Module]) -> int:
    """Replace every ``kind`` child by ``convert(child)``, a shared child by one replacement; how many."""
    done: dict[int, nn.Module] = {}
    for mod in list(model.modules()):
        for child_name, child in list(mod._modules.items()):  # (named_children skips a repeated child)
            if isinstance(child, kind):
                setattr(mod, child_name, done.setdefault(id(child), convert(child)))
    return len(done)


def unpack_for_training(model: nn.Module) -> int:
    """Swap every QuantLinear of ``model`` for its FakeQuantLinear (shared modules once); how many."""
    return _swap(model, QuantLinear, FakeQuantLinear.from_quant)


def pack_after_training(model: nn.Module) -> int:
    """Swap every FakeQuantLinear back for the packed layer on its grid; how many."""
    return _swap(model, FakeQuantLinear, lambda f: f.to_quant())


@contextmanager
def trainable_quantised(model: nn.Module) -> Iterator[int]:
    """Within the block, ``model``'s quantised layers train through their fake-quantised form
    (yields how many); on leaving, each is packed back on its own grid."""
    n = unpack_for_training(model)
    try:
        yield n
    finally:
        pack_after_training(model)
