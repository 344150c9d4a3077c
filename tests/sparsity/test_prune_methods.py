"""Magnitude / Wanda / SparseGPT as recipe stages on tiny models: patterns, save/load, HF reload."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

import modelpress as mp
from modelpress.core.errors import ModelpressError
from modelpress.eval.size import disk_bytes
from modelpress.export.saving import load_compressed, save_compressed
from modelpress.quant.qlinear import QuantLinear
from modelpress.sparsity.algos.magnitude import owl_sparsities
from modelpress.sparsity.layer import SparseLayer, densify, sparsity_summary
from tests.conftest import make_tiny_llama

CALIB = torch.randint(2, 300, (4, 32), generator=torch.Generator().manual_seed(0))


def _compress(stage: dict, model: nn.Module | None = None):
    lm = mp.load(model if model is not None else make_tiny_llama())
    rep = mp.compress(lm, {"name": "t", "stages": [stage]}, calib=CALIB, progress=False)
    return lm, rep


def _logits(module: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return module(CALIB[:2]).logits


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_every_method_gives_the_pattern(method: str, pattern: str) -> None:
    lm, rep = _compress({"method": method, "pattern": pattern, **({"sparsity": 0.5} if pattern == "unstructured" else {})})
    layers = [m for m in lm.module.modules() if isinstance(m, SparseLayer)]
    assert len(layers) == 14 and len(rep["layers"]) == 14  # 7 linears x 2 blocks; lm_head ignored
    for m in layers:
        z = (m.effective_weight() == 0)
        if pattern == "unstructured":
            assert int(z.sum()) == m.weight.numel() // 2
        else:
            mm = int(pattern.split(":")[1])
            assert bool((z.reshape(m.out_features, -1, mm).sum(-1) >= mm // 2).all())
    assert isinstance(lm.module.lm_head, nn.Linear)


def test_bitmask_save_load_bit_exact_and_smaller(tmp_path: Path) -> None:
    lm, _ = _compress({"method": "sparsegpt", "sparsity": 0.5})
    ref = _logits(lm.module)
    weights = {n: m.effective_weight().detach().clone() for n, m in lm.module.named_modules() if isinstance(m, SparseLayer)}
    out = save_compressed(lm, tmp_path / "sparse")
    back = load_compressed(out)
    got = {n: m.effective_weight() for n, m in back.module.named_modules() if isinstance(m, SparseLayer)}
    assert got.keys() == weights.keys()
    for n in weights:
        assert torch.equal(got[n].view(torch.int32), weights[n].view(torch.int32)), n
    assert torch.equal(_logits(back.module), ref)
    # the same weights stored dense take more room: 17 instead of 32 bits per pruned-layer weight
    densify(lm.module)
    dense = save_compressed(lm, tmp_path / "dense")
    n_sparse = sum(w.numel() for w in weights.values())
    saved = disk_bytes(dense) - disk_bytes(out)
    assert saved == pytest.approx(n_sparse * (32 - 17) / 8, rel=0.02)  # minus a longer safetensors header


def test_dense_storage_reloads_with_plain_transformers(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    lm, _ = _compress({"method": "wanda", "pattern": "2:4", "storage": "dense"})
    assert not any(isinstance(m, SparseLayer) for m in lm.module.modules())
    ref = _logits(lm.module)
    out = save_compressed(lm, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert torch.equal(_logits(hf), ref)
    w = hf.model.layers[0].mlp.down_proj.weight
    assert bool(((w == 0).reshape(w.shape[0], -1, 4).sum(-1) >= 2).all())


def test_bitmask_model_densified_reloads_with_plain_transformers(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    lm, _ = _compress({"method": "magnitude", "sparsity": 0.5})
    ref = _logits(lm.module)
    back = load_compressed(save_compressed(lm, tmp_path / "bm"))
    assert densify(back.module) == 14
    hf = AutoModelForCausalLM.from_pretrained(str(save_compressed(back, tmp_path / "hf"))).eval()
    assert torch.equal(_logits(hf), ref)


def test_joint_sparsegpt_int4_saves_and_loads(tmp_path: Path) -> None:
    lm, rep = _compress({"method": "sparsegpt", "pattern": "2:4",
                         "format": {"type": "int", "bits": 4, "granularity": 32}})
    q = lm.module.model.layers[1].mlp.up_proj
    assert isinstance(q, QuantLinear) and "sparsity 0.5" in rep["layers"][0]["notes"][0]
    ref = _logits(lm.module)
    back = load_compressed(save_compressed(lm, tmp_path / "joint"))
    for name, m in back.module.named_modules():
        if isinstance(m, QuantLinear):
            w = m.dequantized_weight()
            assert bool(((w == 0).reshape(w.shape[0], -1, 4).sum(-1) >= 2).all()), name
            assert torch.equal(w, lm.module.get_submodule(name).dequantized_weight())
    assert torch.equal(_logits(back.module), ref)


def test_global_and_per_layer_magnitude() -> None:
    model = make_tiny_llama()
    all_w = torch.cat([m.weight.detach().abs().flatten() for n, m in model.named_modules()
                       if isinstance(m, nn.Linear) and "lm_head" not in n])
    lm, _ = _compress({"method": "magnitude", "sparsity": 0.6, "scope": "global"}, model)
    summ = sparsity_summary(lm.module)
    assert summ["zeros"] == round(0.6 * all_w.numel())
    t = all_w.kthvalue(round(0.6 * all_w.numel())).values
    for m in lm.module.modules():
        if isinstance(m, SparseLayer):  # one threshold for every layer
            w = m.weight.detach().abs()
            assert bool((w[m.mask] >= t).all()) and bool((w[~m.mask] <= t).all())
    lm, _ = _compress({"method": "magnitude", "sparsity": 0.5, "layer_sparsity": {"role:down_proj": 0.8}})
    s = sparsity_summary(lm.module)["layers"]
    assert s["model.layers.0.mlp.down_proj"] == round(0.8 * 64 * 128) / (64 * 128) and s["model.layers.0.mlp.up_proj"] == 0.5


def test_owl_allocation() -> None:
    # hand computation: D = [1, 2, 3] -> densities [0, .1, .2] * ... shifted to mean 0.5
    assert owl_sparsities([1.0, 2.0, 3.0], 0.5, 0.05) == pytest.approx([0.55, 0.5, 0.45])
    assert owl_sparsities([2.0, 2.0], 0.7, 0.08) == [0.7, 0.7]
    lm, rep = _compress({"method": "magnitude", "sparsity": 0.5, "allocation": "owl", "owl_lambda": 0.1})
    s = sparsity_summary(lm.module)["layers"]
    b0, b1 = s["model.layers.0.mlp.up_proj"], s["model.layers.1.mlp.up_proj"]
    assert {round(b0, 4), round(b1, 4)} == {0.4, 0.6}  # two units: spread +-lambda around the target
    assert any("owl" in note for r in rep["layers"] for note in r["notes"])
    with pytest.raises(ModelpressError, match="owl needs calibration data"):
        mp.compress(mp.load(make_tiny_llama()), {"stages": [{"method": "magnitude", "allocation": "owl"}]},
                    progress=False)


def test_conv2d_model_magnitude_and_save(tmp_path: Path) -> None:
    from modelpress.export.saving import load_into

    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(),  # noqa: E731
                                 nn.Linear(8 * 6 * 6, 4))
    model = make()
    lm = mp.load(model)
    mp.compress(lm, {"stages": [{"method": "magnitude", "sparsity": 0.75, "ignore": []}]}, progress=False)
    assert all(isinstance(model[i], SparseLayer) for i in (0, 2, 4))
    assert sparsity_summary(model)["sparsity"] == pytest.approx(0.75, abs=1e-3)
    x = torch.randn(2, 3, 8, 8)
    y = model(x)
    out = save_compressed(lm, tmp_path / "conv")
    fresh = load_into(make(), out)
    assert torch.equal(fresh(x), y)


def test_pruning_an_already_quantised_layer_is_refused() -> None:
    lm = mp.load(make_tiny_llama())
    with pytest.raises(ModelpressError, match=r"q_proj: already compressed \(QuantLinear\); prune before quantising"):
        mp.compress(lm, {"stages": [{"method": "rtn", "format": {"type": "int", "bits": 8}},
                                     {"method": "magnitude", "sparsity": 0.5}]}, progress=False)


def test_rtn_after_pruning_keeps_the_zeros() -> None:
    lm, _ = _compress({"method": "magnitude", "pattern": "2:4"})
    mp.compress(lm, {"stages": [{"method": "rtn", "format": {"type": "int", "bits": 4, "granularity": 32}}]},
                progress=False)
    w = lm.module.model.layers[0].self_attn.o_proj.dequantized_weight()
    assert bool(((w == 0).reshape(w.shape[0], -1, 4).sum(-1) >= 2).all())


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_gptq_after_pruning_keeps_the_zeros_and_beats_rtn(pattern: str) -> None:
    """prune -> gptq: error feedback goes only into kept weights, so the pattern survives quantisation,
    and the quantised model stays closer to the pruned float model than RTN of the same sparse weights."""
    prune = {"method": "wanda", "pattern": pattern, **({"sparsity": 0.5} if pattern == "unstructured" else {})}
    fmt = {"type": "int", "bits": 3, "granularity": 32}
    lm, _ = _compress(prune)
    masks = {n: m.mask.clone() for n, m in lm.module.named_modules() if isinstance(m, SparseLayer)}
    ref = _logits(lm.module)
    rep = mp.compress(lm, {"stages": [{"method": "gptq", "format": fmt}]}, calib=CALIB, progress=False)
    lm_rtn, _ = _compress(prune)
    mp.compress(lm_rtn, {"stages": [{"method": "rtn", "format": fmt}]}, progress=False)
    assert len(masks) == 14
    for n, keep in masks.items():
        w = lm.module.get_submodule(n).dequantized_weight()
        assert bool((w[~keep] == 0).all()), n
    notes = {r["name"]: " ".join(r["notes"]) for r in rep["layers"]}
    assert all("kept the earlier stage's zeros" in notes[n] for n in masks)
    err = lambda m: float((_logits(m) - ref).pow(2).mean())  # noqa: E731
    assert err(lm.module) < 0.8 * err(lm_rtn.module)


def test_interrupted_sparsegpt_run_resumes_bit_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's per-block checkpoints hold SparseLayers (bitmask + values) and restore them."""
    import copy

    from modelpress.pipeline import sequential

    recipe = {"name": "r", "stages": [{"method": "sparsegpt", "sparsity": 0.5}]}
    base = make_tiny_llama(seed=5, layers=3)
    ref = mp.load(copy.deepcopy(base))
    mp.apply(ref, recipe, calib=CALIB, progress=False)
    real = sequential.run_sequential

    def crash_at_block_2(*a, **kw):
        def before(i: int) -> None:
            if i == 2:
                raise KeyboardInterrupt
        return real(*a, **{**kw, "before_block": before})

    monkeypatch.setattr(sequential, "run_sequential", crash_at_block_2)
    with pytest.raises(KeyboardInterrupt):
        mp.apply(mp.load(copy.deepcopy(base)), recipe, calib=CALIB, progress=False, workdir=tmp_path / "w")
    monkeypatch.setattr(sequential, "run_sequential", real)
    fresh = mp.load(copy.deepcopy(base))
    ctx = mp.apply(fresh, recipe, calib=CALIB, progress=False, workdir=tmp_path / "w")
    assert any("resumed from checkpoint after block 1" in w for w in ctx.warnings)
    a, b = ref.module.state_dict(), fresh.module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert isinstance(fresh.module.model.layers[0].mlp.up_proj, SparseLayer)
