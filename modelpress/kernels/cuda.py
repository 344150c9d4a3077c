"""CUDA kernels: FP8 matmul (``torch._scaled_mm``) and 2:4 semi-structured sparse matmul.

UNTESTED ON A GPU: this project's machines have none. Each kernel checks the device (type and
compute capability) and, when the check fails, selection falls back to the reference kernel and
says so; the tests only exercise those refusals. The code follows the documented signatures of
torch 2.13 (``_scaled_mm(a, b, scale_a, scale_b, out_dtype=...)`` with ``b`` column-major, and
``torch.sparse.to_sparse_semi_structured``) and is kept minimal on purpose.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quant.formats.base import QTensor
from ..quant.formats.fp8 import FP8Format
from ..quant.granularity import PerChannel, PerTensor
from .reference import KernelLinear
from ..core.layers import set_submodule as set_module
from .registry import KERNELS, KernelPlan


def _capability(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


class Fp8ScaledMMLinear(KernelLinear):
    """E4M3 weight (N, K) with per-channel scales; activations cast to E4M3 per row on each call."""

    kernel_name = "cuda-fp8"

    def __init__(self, qt: QTensor, bias: torch.Tensor | None, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(qt.shape[0], qt.shape[1], bias, dtype)
        n = qt.shape[0]
        w = qt.codes.view(torch.float8_e4m3fn).to(device)  # (N, K): our E4M3 codes are torch's bits
        self.register_buffer("weight_t", w.t())  # (K, N) column-major, as _scaled_mm wants for b
        self.register_buffer("w_scale", qt.params["scale"].float().reshape(-1).expand(n).reshape(1, n).contiguous().to(device))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:  # (M, K)
        amax = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12)  # (M, 1)
        x_scale = amax / 448.0
        xq = (x.float() / x_scale).to(torch.float8_e4m3fn)
        return torch._scaled_mm(xq, self.weight_t, x_scale, self.w_scale, out_dtype=self.compute_dtype)


@KERNELS.register
class Fp8Kernel:
    """FP8 E4M3 per-tensor/per-channel weights on sm89+ GPUs (untested: no GPU here)."""

    name = "cuda-fp8"
    op = "linear"
    formats = ("fp8",)
    backend = "cuda"
    priority = 20
    tested = False

    @classmethod
    def unsupported(cls, qt: QTensor, device: torch.device) -> str | None:
        cap = _capability(device)
        if cap is None:
            return f"it needs a CUDA GPU and the device is {device.type}"
        if cap < (8, 9):
            return f"FP8 matmul needs compute capability 8.9+, device has {cap[0]}.{cap[1]}"
        fmt = qt.fmt
        if not isinstance(fmt, FP8Format) or fmt.variant != "e4m3":
            return "it takes E4M3 weights only"
        if not isinstance(fmt.granularity, (PerChannel, PerTensor)):
            return "it takes per-tensor or per-channel scales only"
        if qt.shape[0] % 16 or qt.shape[1] % 16:
            return f"shape {qt.shape} is not a multiple of 16"
        return None

    @classmethod
    def build(cls, qt: QTensor, bias: torch.Tensor | None, device: torch.device,
              dtype: torch.dtype = torch.bfloat16) -> nn.Module:
        return Fp8ScaledMMLinear(qt, bias, device, dtype)


def is_2to4(w: torch.Tensor) -> bool:
    """Whether every group of 4 consecutive inputs of each row has at most 2 non-zeros."""
    if w.shape[1] % 4:
        return False
    return bool(((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


def sparse24_unsupported(weight: torch.Tensor, device: torch.device) -> str | None:
    """Why a dense (N, K) weight cannot run as 2:4 semi-structured sparse on ``device``, or None."""
    cap = _capability(device)
    if cap is None:
        return f"2:4 sparse matmul needs a CUDA GPU and the device is {device.type}"
    if cap < (8, 0):
        return f"2:4 sparse matmul needs compute capability 8.0+, device has {cap[0]}.{cap[1]}"
    if not is_2to4(weight):
        return "the weight does not have a 2:4 pattern"
    if weight.shape[0] % 64 or weight.shape[1] % 64:
        return f"shape {tuple(weight.shape)} is not a multiple of 64"
    return None


class Sparse24Linear(nn.Module):
    """A Linear whose weight is a ``SparseSemiStructuredTensor`` (fp16/bf16, CUDA)."""

    def __init__(self, lin: nn.Linear, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        from torch.sparse import to_sparse_semi_structured

        self.weight = nn.Parameter(to_sparse_semi_structured(lin.weight.detach().to(device, dtype)), requires_grad=False)
        self.bias = nn.Parameter(lin.bias.detach().to(device, dtype), requires_grad=False) if lin.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


def install_sparse24(model: nn.Module, device: torch.device | str, dtype: torch.dtype = torch.float16) -> KernelPlan:
    """Replace 2:4-sparse ``nn.Linear`` layers by semi-structured sparse ones where the GPU allows.

    Layers that cannot (CPU, old GPU, no 2:4 pattern) stay dense; the plan says why.
    """
    dev = torch.device(device)
    plan = KernelPlan("cuda-sparse24")
    for name, m in list(model.named_modules()):
        if type(m) is not nn.Linear:
            continue
        reason = sparse24_unsupported(m.weight, dev)
        if reason is None:
            set_module(model, name, Sparse24Linear(m, dev, dtype))
            plan.rows.append((name, "cuda-sparse24", None))
        else:
            plan.rows.append((name, "dense", f"kernel 'cuda-sparse24' requested but {reason}; kept dense"))
    return plan
