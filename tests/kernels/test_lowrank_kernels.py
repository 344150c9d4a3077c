"""Factorised layers through the kernel registry: merged vs factored by cost, quantised parts on their
format kernels, fallbacks with a note."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from modelpress.kernels import KERNELS, install_kernels, select_kernel
from modelpress.kernels.cpu import Int4PackLinear
from modelpress.kernels.lowrank import CorrectedLinear, FactoredLinear, FactorPair, MergedLinear
from modelpress.lowrank import CompensatedLinear, LowRankLinear
from modelpress.quant.formats import IntFormat
from modelpress.quant.qlinear import QuantLinear

CPU = torch.device("cpu")
INT4 = IntFormat(bits=4, granularity=32)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max())


def _lowrank(in_f: int, out_f: int, rank: int, bias: bool, g: torch.Generator) -> LowRankLinear:
    B = torch.randn(out_f, rank, generator=g) / rank ** 0.5  # (out, r)
    A = torch.randn(rank, in_f, generator=g) / in_f ** 0.5  # (r, in)
    return LowRankLinear.from_factors(B, A, torch.randn(out_f, generator=g) if bias else None)


def _mixed_model() -> nn.Sequential:
    """Break-even ranks: 96->64: 38.4, 64->128: 42.7, 128->64: 42.7, 64->64: 32."""
    g = torch.Generator().manual_seed(0)
    return nn.Sequential(_lowrank(96, 64, 16, True, g), nn.ReLU(),   # below: factored
                         _lowrank(64, 128, 48, True, g), nn.ReLU(),  # above: merged
                         _lowrank(128, 64, 8, False, g), nn.ReLU(),  # below: factored
                         _lowrank(64, 64, 32, False, g))             # exactly at: merged (one matmul, same cost)


def test_plan_names_merged_and_factored_layers_and_outputs_match() -> None:
    m = _mixed_model()
    x = torch.randn(7, 96, generator=torch.Generator().manual_seed(1))
    ref = m(x)
    plan = install_kernels(m)  # bf16, auto
    assert {n: k for n, k, _ in plan.rows} == {"0": "lowrank-factored", "2": "lowrank-merged",
                                               "4": "lowrank-factored", "6": "lowrank-merged"}
    assert plan.notes() == []
    assert [type(m[i]) for i in (0, 2, 4, 6)] == [FactoredLinear, MergedLinear, FactoredLinear, MergedLinear]
    assert m[0].A.dtype == m[0].B.dtype == m[2].weight.dtype == torch.bfloat16
    assert _rel(m(x), ref) < 3e-2  # bf16 factors, activations and outputs through 4 layers


def test_float32_kernels_are_exact_up_to_rounding() -> None:
    m = _mixed_model()
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(2))
    ref = m(x)
    install_kernels(m, dtype=torch.float32)
    assert _rel(m(x), ref) < 1e-5


@pytest.mark.parametrize("rank,kernel", [(31, "lowrank-factored"), (32, "lowrank-merged"), (64, "lowrank-merged")])
def test_auto_choice_follows_the_break_even_rank(rank: int, kernel: str) -> None:
    g = torch.Generator().manual_seed(0)
    pair = FactorPair.of(_lowrank(64, 64, rank, False, g))  # break-even 64 * 64 / 128 = 32
    assert select_kernel(pair, CPU, "auto", op="lowrank").kernel.name == kernel


def _compensated(g: torch.Generator, rank: int = 8) -> tuple[CompensatedLinear, QuantLinear]:
    w = torch.randn(64, 128, generator=g) * 0.05
    base = QuantLinear.from_linear_weight(INT4.quantize(w), torch.randn(64, generator=g))
    B, A = torch.randn(64, rank, generator=g) * 0.05, torch.randn(rank, 128, generator=g) * 0.05
    return CompensatedLinear.from_factors(base, B, A), base


def test_compensated_base_gets_int4pack_and_correction_runs_in_kernel_dtype() -> None:
    g = torch.Generator().manual_seed(3)
    comp, base = _compensated(g)
    assert KERNELS.get("int4pack").unsupported(base.qtensor(), CPU) is None  # the shape int4pack takes
    m = nn.Sequential(comp)
    x = torch.randn(5, 128, generator=g)
    ref = m(x.bfloat16().float())  # the same rounded input the bf16 kernels see
    plan = install_kernels(m)
    assert [(n, k) for n, k, _ in plan.rows] == [("0.base", "int4pack"), ("0", "lowrank-factored")]
    assert isinstance(m[0], CorrectedLinear) and isinstance(m[0].base, Int4PackLinear)
    assert isinstance(m[0].correction, FactoredLinear) and m[0].correction.A.dtype == torch.bfloat16
    assert _rel(m(x), ref) < 2e-2


def test_quantised_factors_get_their_own_format_kernels() -> None:
    g = torch.Generator().manual_seed(4)
    lr = _lowrank(128, 64, 32, True, g)
    for name in ("A", "B"):
        child = getattr(lr, name)
        setattr(lr, name, QuantLinear.from_linear_weight(INT4.quantize(child.weight.detach()), child.bias))
    m = nn.Sequential(lr)
    x = torch.randn(4, 128, generator=g)
    ref = m(x.bfloat16().float())
    plan = install_kernels(m)
    assert {n: k for n, k, _ in plan.rows} == {"0.A": "int4pack", "0.B": "int4pack"}  # the parent has no float pair
    assert isinstance(m[0], LowRankLinear) and isinstance(m[0].A, Int4PackLinear) and isinstance(m[0].B, Int4PackLinear)
    assert _rel(m(x), ref) < 3e-2  # two bf16 matmuls in a row


def test_kernel_that_cannot_take_a_factorised_layer_falls_back_with_a_note() -> None:
    m = _mixed_model()
    x = torch.randn(2, 96)
    ref = m(x)
    with pytest.warns(UserWarning, match="kernel 'int4pack' requested but it computes linear, not lowrank"):
        plan = install_kernels(m, prefer="int4pack", dtype=torch.float32)
    assert plan.counts() == {"reference": 4} and all(isinstance(m[i], LowRankLinear) for i in (0, 2, 4, 6))
    assert torch.equal(m(x), ref)  # the layers are left as they were


def test_named_merge_below_break_even_falls_back_and_says_why() -> None:
    m = _mixed_model()
    with pytest.warns(UserWarning, match="kernel 'lowrank-merged' requested but rank"):
        plan = install_kernels(m, prefer="lowrank-merged")
    assert {n: k for n, k, _ in plan.rows} == {"0": "reference", "2": "lowrank-merged",
                                               "4": "reference", "6": "lowrank-merged"}
    assert "rank 16 is below the break-even 38 of a 64x96 weight" in " ".join(plan.notes())
