"""Training through quantised activations: fake quantisation of a layer's input, and exact W8A8 packing.

A :class:`~modelpress.quant.fake.FakeQuantLinear` whose ``act`` is an :class:`ActFakeQuant`
fake-quantises its input before the (fake-quantised) weight. The input grid is signed,
``codes = clamp(round(x / s) + z, qmin, qmax)``, value ``(codes - z) * s``, as the int8 runtime
(:mod:`modelpress.quant.activation`) computes it, and either

* dynamic: ``(s, z)`` from each token's (or the whole input's) range at run time, treated as constants
  in the backward pass, so ``dx_hat/dx = 1`` wherever the code is not clipped; or
* static: one step size ``s`` and (asymmetric) zero point ``z`` per layer, initialised from a
  calibration observer and trained with LSQ (Esser et al., 2020) / LSQ+ (Bhalgat et al., 2020):
  ``d/ds = round(x/s) - x/s`` inside the range and ``b - z`` clipped to a bound ``b``, ``d/dz = 0``
  inside and ``-s`` clipped, both scaled by ``g = 1 / sqrt(numel(x) * qmax)``.

When the weight is on the runtime's grid (int 8-bit, symmetric, per output channel) and the input is
8-bit, the forward *value* is computed the way :class:`~modelpress.quant.activation.ActQuantLinear`
computes it (exact integer accumulator, then ``acc * s_x * s_w + b`` in float32), with the float
straight-through product supplying the gradient. So :meth:`ActFakeQuant.pack` gives a layer whose
outputs equal the fake-quantised layer's bit for bit. A float product ``(x_hat @ w_hat^T)`` would
round each partial product and differ from the integer runtime in the last bits.
"""
from __future__ import annotations

import math
from typing import Callable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, model_validator

from ..core.config import Config
from ..core.errors import ModelpressError
from .activation import ActQuantLinear, ActQuantSpec, act_qparams, int_grid
from .fake import _MIN_STEP, FakeQuantLinear, LearnedGridLinear, grad_scale, round_ste
from .formats.base import QTensor, WeightFormat
from .formats.integer import IntFormat
from .granularity import PerChannel
from .observers import OBSERVERS
from .qlinear import QuantLinear


class ActFakeSpec(Config):
    """How a fake-quantised layer quantises its input during training.

    Fields:
        bits: activation code width, 2..8 (the W8A8 runtime packs 8 only).
        mode: ``dynamic`` (qparams from each input) or ``static`` (a learned step size and zero point).
        granularity: ``per_token`` (dynamic only) or ``per_tensor``.
        symmetric: zero point fixed at 0, or an integer zero point (static: learned, LSQ+).
        observer: how a static scale is initialised from the calibration inputs (``minmax``,
            ``histogram`` ... as in ``int8-static``).
        learn_zero: train a static asymmetric zero point (LSQ+); else it stays at its calibrated value.

    Example:
        >>> ActFakeSpec(mode="static", granularity="per_tensor", symmetric=False).runtime_spec().mode
        'static'
    """

    bits: int = Field(8, ge=2, le=8)
    mode: Literal["dynamic", "static"] = "static"
    granularity: Literal["per_token", "per_tensor"] = "per_tensor"
    symmetric: bool = False
    observer: Literal["minmax", "moving_average", "percentile", "mse", "histogram"] = "minmax"
    learn_zero: bool = True

    @model_validator(mode="after")
    def _static_is_per_tensor(self) -> "ActFakeSpec":
        if self.mode == "static" and self.granularity != "per_tensor":
            raise ValueError("static activation scales are per_tensor (token counts vary at run time)")
        return self

    def runtime_spec(self) -> ActQuantSpec:
        """The :class:`ActQuantSpec` of the packed layer (``bits`` must be 8, see :func:`w8a8_problem`)."""
        return ActQuantSpec(mode=self.mode, granularity=self.granularity, symmetric=self.symmetric)

    def describe(self) -> str:
        sym = "symmetric" if self.symmetric else "asymmetric"
        return f"{self.bits}-bit {self.mode} {self.granularity} {sym} activations"


def w8a8_problem(fmt: WeightFormat, spec: ActFakeSpec) -> str | None:
    """Why weights in ``fmt`` with activations ``spec`` have no runtime layer (None: ActQuantLinear packs them).

    Example:
        >>> w8a8_problem(IntFormat(bits=8, granularity="channel"), ActFakeSpec()) is None
        True
    """
    runtime_weight = isinstance(fmt, IntFormat) and fmt.bits == 8 and fmt.symmetric \
        and isinstance(fmt.granularity, PerChannel)
    if runtime_weight and spec.bits == 8:
        return None
    return (f"no runtime layer for weights {fmt.to_dict()} with {spec.describe()}: the W8A8 layer (ActQuantLinear) "
            "needs int 8-bit symmetric per-channel weights and 8-bit activations")


def lsq_act_fake_quant(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int,
                       g: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LSQ / LSQ+ on a signed activation grid: codes ``clamp(round(x / s) + z, qmin, qmax)`` and ``x_hat``.

    The zero point is added *after* rounding, as the int8 runtime does (``round(x/s + z)`` can differ
    from it by one code in float32), so the codes here are the runtime's codes. Rounding is
    straight-through, and the gradients of ``s`` and ``z`` are scaled by ``g``.

    Args:
        x: (n, in) inputs. s, z: step size and zero point (in codes), broadcastable to x.
        qmin, qmax: the code range. g: LSQ's gradient scale, ``1 / sqrt(numel(x) * qmax)``.

    Returns:
        (codes, x_hat), both like x; ``x_hat = (codes - z) * s``.

    Example:
        >>> s = torch.tensor([0.5], requires_grad=True)
        >>> lsq_act_fake_quant(torch.tensor([0.3, 100.0]), s, torch.zeros(1), -127, 127, 1.0)[1].sum().backward()
        >>> s.grad  # (1 - 0.6) + 127: in range, then clipped
        tensor([127.4000])
    """
    s, z = grad_scale(s, g), grad_scale(z, g)
    codes = torch.clamp(round_ste(x / s) + z, qmin, qmax)  # (n, in)
    return codes, (codes - z) * s


class ActFakeQuant(nn.Module):
    """The input quantiser of a fake-quantised linear (dynamic, or static with LSQ / LSQ+ parameters).

    A static quantiser's step size is trained as a multiple of its calibrated start (``s = scale * s0``,
    as the weight grids of :class:`~modelpress.quant.fake.LearnedGridLinear`), its zero point in codes.

    Example:
        >>> a = ActFakeQuant(ActFakeSpec(mode="dynamic", granularity="per_token", symmetric=True))
        >>> x = torch.randn(3, 16)
        >>> bool((a(x) - x).abs().max() <= x.abs().amax() / 127 / 2 + 1e-6)
        True
    """

    def __init__(self, spec: ActFakeSpec) -> None:
        super().__init__()
        self.spec = spec
        self.qmin, self.qmax = int_grid(spec.bits, spec.symmetric)
        self.observer = None  # set while calibrating (static)
        static = spec.mode == "static"
        self.register_buffer("s0", torch.ones(1) if static else None)
        self.scale = nn.Parameter(torch.ones(1)) if static else None
        self.zero = nn.Parameter(torch.zeros(1), requires_grad=spec.learn_zero) \
            if static and not spec.symmetric else None
        self.calibrated = not static

    @classmethod
    def from_runtime(cls, layer: ActQuantLinear) -> "ActFakeQuant":
        """The quantiser of a packed W8A8 layer, on its stored scale and zero point."""
        s = layer.spec
        a = cls(ActFakeSpec(bits=8, mode=s.mode, granularity=s.granularity, symmetric=s.symmetric))
        if s.mode == "static":
            zero = getattr(layer, "act_zero", None)
            a.set_qparams(layer.act_scale, zero if zero is not None else torch.zeros(1))
        return a

    @torch.no_grad()
    def set_qparams(self, scale: torch.Tensor, zero: torch.Tensor) -> None:
        """Start a static quantiser at ``(scale, zero)`` (0-d or (1,) tensors)."""
        self.s0.copy_(scale.detach().float().reshape(1))
        self.scale.fill_(1.0)
        if self.zero is not None:
            self.zero.copy_(zero.detach().float().reshape(1))
        self.calibrated = True

    def qparams(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, z) for ``X`` (n, in): static (1,) with gradients, dynamic (n, 1) or 0-d constants."""
        if self.spec.mode == "static":
            if not self.calibrated:
                raise ModelpressError("a static activation quantiser was used before calibration")
            s = (self.scale * self.s0).clamp_min(_MIN_STEP)  # (1,)
            z = torch.clamp(round_ste(self.zero), self.qmin, self.qmax) if self.zero is not None else torch.zeros_like(s)
            return s, z
        lo, hi = (X.amin(-1, keepdim=True), X.amax(-1, keepdim=True)) if self.spec.granularity == "per_token" \
            else (X.amin(), X.amax())
        s, z = act_qparams(lo.detach(), hi.detach(), self.spec.symmetric, self.spec.bits)
        return s, z.to(torch.float32)

    def quantize(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes, x_hat, s, z) of ``X`` (n, in): codes and ``x_hat`` with LSQ's straight-through
        gradients (``g = 1 / sqrt(numel(X) * qmax)``), and the step size and zero point they used."""
        s, z = self.qparams(X)
        codes, x_hat = lsq_act_fake_quant(X, s, z, self.qmin, self.qmax, 1.0 / math.sqrt(X.numel() * self.qmax))
        return codes, x_hat, s, z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` fake-quantised (per token over its last dimension), float32."""
        return self.quantize(x.reshape(-1, x.shape[-1]).float())[1].reshape(x.shape)

    # ---- inside a FakeQuantLinear ----------------------------------------------------------------
    def linear(self, x: torch.Tensor, layer: FakeQuantLinear) -> torch.Tensor:
        """``layer``'s forward with its input fake-quantised; the runtime's exact value where one packs it."""
        in_f = layer.weight.shape[1]
        X = x.reshape(-1, in_f).float()  # (n, in)
        bias = layer.bias.float() if layer.bias is not None else None
        if self.observer is not None:  # calibrating: observe the input, pass it through unquantised
            self.observer.update(X.detach())
            return F.linear(x, layer.quantized_weight().to(x.dtype), bias.to(x.dtype) if bias is not None else None)
        codes, x_hat, s, z = self.quantize(X)
        y = F.linear(x_hat, layer.quantized_weight().float(), bias)  # (n, out) straight-through surrogate
        if w8a8_problem(layer.fmt, self.spec) is None:
            qw, s_w = runtime_weight(layer)  # (out, in) int8, (out,)
            acc = (codes.detach() - z.detach()).double() @ qw.double().t()  # (n, out), exact integers
            exact = acc.float() * s.detach() * s_w  # ActQuantLinear.forward's order and dtypes
            if bias is not None:
                exact = exact + bias.detach()
            y = exact + (y - y.detach())
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)

    def pack(self, layer: FakeQuantLinear) -> ActQuantLinear:
        """The W8A8 layer computing exactly what ``layer`` (with this quantiser) computes; refused,
        naming the combination, when no runtime layer exists for it."""
        why = w8a8_problem(layer.fmt, self.spec)
        if why is not None:
            raise ModelpressError(why)
        qw, s_w = runtime_weight(layer)
        tensors = {"qweight": qw, "weight_scale": s_w, "bias": layer.bias.detach() if layer.bias is not None else None}
        if self.spec.mode == "static":
            s, z = self.qparams(torch.zeros(1, 1))
            tensors["act_scale"] = s.detach().reshape(1)
            if not self.spec.symmetric:
                tensors["act_zero"] = z.detach().to(torch.int32).reshape(1)
        return ActQuantLinear(self.spec.runtime_spec(), tensors)

    # ---- calibration of a static quantiser -------------------------------------------------------
    def start_calibration(self) -> None:
        """Observe inputs (passed through unquantised) until :meth:`finish_calibration`."""
        self.observer = OBSERVERS.get(self.spec.observer)()

    def finish_calibration(self) -> None:
        """Set the start grid from what the observer saw (the int8-static observers' maths)."""
        scale, zero = self.observer.qparams(self.spec.bits, self.spec.symmetric)
        self.observer = None
        self.set_qparams(scale, zero)


def runtime_weight(layer: FakeQuantLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """``layer``'s int8 per-channel symmetric grid as the runtime stores it: signed codes (out, in) int8
    and float32 scales (out,), the codes the forward pass uses now."""
    codes, p = layer.grid_codes()  # (out, 1, in) uint8, scale (out, 1, 1)
    out_f, in_f = layer.weight.shape
    q = codes.reshape(out_f, -1)[:, :in_f].to(torch.int16) - layer.fmt.mid
    return q.to(torch.int8), p["scale"].reshape(out_f).to(torch.float32)


def fake_from_runtime(layer: ActQuantLinear, learn_zero: bool = False) -> LearnedGridLinear:
    """A packed W8A8 layer as a learned-grid fake-quantised layer on its own codes, scales and activation
    qparams (its weight grid: int 8-bit symmetric per channel, float32 scales, so nothing is rounded).

    Example:
        >>> q = ActQuantLinear.from_linear(nn.Linear(16, 4), ActQuantSpec())
        >>> x = torch.randn(3, 16)
        >>> torch.equal(fake_from_runtime(q)(x), q(x))
        True
    """
    fmt = IntFormat(bits=8, symmetric=True, granularity=PerChannel(), scale_dtype="float32")
    codes = (layer.qweight.to(torch.int16) + fmt.mid).to(torch.uint8)  # (out, in)
    qt = QTensor(fmt, tuple(layer.qweight.shape), codes, {"scale": layer.weight_scale.float().reshape(-1, 1)})
    f = LearnedGridLinear.from_quant(QuantLinear.from_linear_weight(qt, layer.bias), learn_zero=learn_zero)
    f.act = ActFakeQuant.from_runtime(layer)
    return f


@torch.no_grad()
def calibrate_static(layers: list[FakeQuantLinear], run: Callable[[], None]) -> int:
    """Initialise every static input quantiser of ``layers`` from its observer over ``run()`` (which
    feeds calibration data through them, inputs unquantised); how many were initialised."""
    acts = [f.act for f in layers if f.act is not None and f.act.spec.mode == "static"]
    if not acts:
        return 0
    for a in acts:
        a.start_calibration()
    try:
        run()
    except BaseException:
        for a in acts:
            a.observer = None
        raise
    for a in acts:
        a.finish_calibration()
    return len(acts)


__all__ = ["ActFakeQuant", "ActFakeSpec", "calibrate_static", "fake_from_runtime", "lsq_act_fake_quant",
           "runtime_weight", "w8a8_problem"]
