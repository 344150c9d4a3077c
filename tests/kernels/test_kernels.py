"""Kernels against the dequantise-then-matmul reference, and registry selection / override / fallback."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from modelpress.kernels import KERNELS, install_kernels, prefer_kernel, select_kernel
from modelpress.kernels.cpu import int4_group, to_int4pack
from modelpress.kernels.reference import KernelLinear
from modelpress.quant.formats import FP8Format, IntFormat, NF4Format
from modelpress.quant.qlinear import QuantLinear

CPU = torch.device("cpu")


def _case(fmt: IntFormat, n: int = 64, k: int = 256, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    qt = fmt.quantize(w)
    bias = torch.randn(n, generator=g)
    x = torch.randn(5, k, generator=g)
    return qt, bias, x


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


INT4_FORMATS = [IntFormat(bits=4, symmetric=s, granularity=g) for s in (True, False) for g in (32, 64, 128)] + \
               [IntFormat(bits=3, granularity=64), IntFormat(bits=2, symmetric=False, granularity=32),
                IntFormat(bits=4, granularity="channel")]


@pytest.mark.parametrize("fmt", INT4_FORMATS, ids=lambda f: f"b{f.bits}-{'sym' if f.symmetric else 'asym'}-"
                         f"{getattr(f.granularity, 'size', f.granularity.kind)}")
@pytest.mark.parametrize("k", [256, 576])
def test_int4pack_equals_reference(fmt: IntFormat, k: int) -> None:
    qt, bias, x = _case(fmt, k=k)
    ref = nn.functional.linear(x, qt.dequantize(), bias)  # float32 reference, QuantLinear's maths
    k32 = KERNELS.get("int4pack").build(qt, bias, CPU, torch.float32)
    assert _rel(k32(x), ref) < 1e-5  # float32 activations: the conversion itself is exact
    k16 = KERNELS.get("int4pack").build(qt, bias, CPU, torch.bfloat16)
    ref16 = nn.functional.linear(x.bfloat16().float(), qt.dequantize(), bias)  # same rounded input
    assert _rel(k16(x), ref16) < 2e-2  # bf16 scales (8-bit mantissa) and bf16 output


def test_int4pack_dequantised_weight_matches_codes_exactly() -> None:
    """Decode the kernel's packed form by its documented convention and compare with our decode bitwise."""
    fmt = IntFormat(bits=4, symmetric=False, granularity=128, scale_dtype="float16")
    qt, _, _ = _case(fmt, k=576)
    packed, sz, g = to_int4pack(qt, torch.float32)
    assert g == 64  # 576 = 4 * 128 + 64: group 128 is represented by pairs of 64-wide groups
    eye = torch.eye(576)
    w_kernel = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, packed, g, sz).t()  # (N, K): columns of I
    assert torch.equal(w_kernel, qt.dequantize())


@pytest.mark.parametrize("fmt", [IntFormat(bits=8), IntFormat(bits=8, symmetric=False),
                                 IntFormat(bits=4, granularity="channel"), IntFormat(bits=8, granularity="tensor")],
                         ids=["w8-sym", "w8-asym", "w4-channel", "w8-tensor"])
def test_int8pack_equals_reference(fmt: IntFormat) -> None:
    qt, bias, x = _case(fmt)
    ref = nn.functional.linear(x, qt.dequantize(), bias)
    assert _rel(KERNELS.get("int8pack").build(qt, bias, CPU, torch.float32)(x), ref) < 1e-5
    ref16 = nn.functional.linear(x.bfloat16().float(), qt.dequantize(), bias)
    assert _rel(KERNELS.get("int8pack").build(qt, bias, CPU, torch.bfloat16)(x), ref16) < 2e-2


def test_int8_dynamic_close_to_reference() -> None:
    qt, bias, x = _case(IntFormat(bits=8))
    ref = nn.functional.linear(x, qt.dequantize(), bias)
    err = _rel(KERNELS.get("int8-dynamic").build(qt, bias, CPU, torch.float32)(x), ref)
    assert err < 5e-2  # activations are rounded to (7-bit reduced-range) int8 too


def test_auto_selection_by_format() -> None:
    assert select_kernel(_case(IntFormat(bits=4, granularity=64))[0], CPU, "auto").kernel.name == "int4pack"
    assert select_kernel(_case(IntFormat(bits=8))[0], CPU, "auto").kernel.name == "int8pack"
    c = select_kernel(_case(IntFormat(bits=8, granularity=64))[0], CPU, "auto")
    assert c.kernel.name == "reference" and "groups of 64" in c.note
    c = select_kernel(NF4Format().quantize(torch.randn(64, 128)), CPU, "auto")
    assert c.kernel.name == "reference" and "no kernel for nf4" in c.note


def test_group16_cannot_use_int4pack() -> None:
    qt = _case(IntFormat(bits=4, granularity=16))[0]
    assert int4_group(qt) is None
    c = select_kernel(qt, CPU, "int4pack")
    assert c.kernel.name == "reference" and "requested but no kernel group size" in c.note


def test_override_by_argument_env_and_context(monkeypatch: pytest.MonkeyPatch) -> None:
    qt = _case(IntFormat(bits=4, granularity="channel"))[0]
    assert select_kernel(qt, CPU).kernel.name == "int4pack"
    monkeypatch.setenv("MODELPRESS_KERNEL", "int8pack")
    assert select_kernel(qt, CPU).kernel.name == "int8pack"
    with prefer_kernel("reference"):
        assert select_kernel(qt, CPU).kernel.name == "reference"
    assert select_kernel(qt, CPU, "int4pack").kernel.name == "int4pack"  # the argument wins


def test_unknown_kernel_is_a_user_error() -> None:
    from modelpress.core.errors import ModelpressError

    with pytest.raises(ModelpressError, match="unknown kernel 'nope'"):
        select_kernel(_case(IntFormat(bits=4))[0], CPU, "nope")


def test_cuda_kernel_on_cpu_falls_back_and_says_so() -> None:
    qt = FP8Format().quantize(torch.randn(64, 128))
    c = select_kernel(qt, CPU, "cuda-fp8")
    assert c.kernel.name == "reference"
    assert "needs a cuda device and this one is cpu" in c.note
    assert not KERNELS.get("cuda-fp8").tested
    from modelpress.kernels.cuda import install_sparse24

    lin = nn.Sequential(nn.Linear(128, 64))
    lin[0].weight.data.reshape(64, 32, 4)[..., :2] = 0  # a 2:4 pattern
    plan = install_sparse24(lin, "cpu")
    assert plan.counts() == {"dense": 1} and "needs a CUDA GPU" in plan.notes()[0]


def _tiny_quant_model(fmt: IntFormat) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 40))  # 40: not a multiple of 16
    for i in (0, 2):
        m[i] = QuantLinear.from_linear_weight(fmt.quantize(m[i].weight.detach()), m[i].bias.detach())
    return m


def test_install_replaces_layers_and_keeps_outputs() -> None:
    m = _tiny_quant_model(IntFormat(bits=4, granularity=32))
    x = torch.randn(3, 128)
    ref = m(x)
    plan = install_kernels(m, dtype=torch.float32)
    assert isinstance(m[0], KernelLinear) and plan.counts() == {"int4pack": 1, "reference": 1}
    assert "out_features 40 is not a multiple of 16" in " ".join(plan.notes())
    assert _rel(m(x), ref) < 1e-5


def test_install_explicit_fallback_warns() -> None:
    m = _tiny_quant_model(IntFormat(bits=4, granularity=32))
    with pytest.warns(UserWarning, match="kernel 'int8pack' requested but it needs one scale per output channel"):
        plan = install_kernels(m, prefer="int8pack", dtype=torch.float32)
    assert plan.counts() == {"reference": 2}
