"""Adapters through PEFT on tiny LLaMAs built in code: LoRA/DoRA on our quantised layers (NF4
double-quantised, GPTQ, AWQ, HQQ) against the formulas computed from the dequantised weight, the
adapter loaded back by plain ``peft.PeftModel.from_pretrained`` (in a fresh process too), merging
into a quantised base (re-quantised; the reported error recomputed independently), VeRA / AdaLoRA /
IA3 on fp32, refusals, the qlora-nf4 built-in and the ``adapt`` command."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

peft = pytest.importorskip("peft")

import modelpress as mp  # noqa: E402
from modelpress.core.errors import ModelpressError  # noqa: E402
from modelpress.distill.trainer import TrainConfig, TrainData  # noqa: E402
from modelpress.lowrank.adapters import AdapterConfig, attach, merge_adapter, train_adapter  # noqa: E402
from modelpress.lowrank.layer import CompensatedLinear  # noqa: E402
from modelpress.quant.formats import NF4Format  # noqa: E402
from modelpress.quant.granularity import PerGroup  # noqa: E402
from modelpress.quant.qlinear import QuantLinear  # noqa: E402
from tests.conftest import make_tiny_llama  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CALIB = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(1))
IDS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
# a learnable stream (period 7) so a few steps lower the loss
TRAIN = TrainData((torch.arange(16 * 32).view(16, 32) % 7 + 10) * 3)
BASES = {"nf4": "qlora-nf4", "gptq": "gptq-w4-g64", "awq": "awq-w4-g64", "hqq": "hqq-w4-g64"}


@pytest.fixture(scope="module")
def fp32():
    return make_tiny_llama(layers=2, hidden=64, inter=128)


@pytest.fixture(scope="module")
def quantised(fp32):
    """Each built-in base applied once to a copy of the fp32 model (module -> copied per test)."""
    cache: dict[str, nn.Module] = {}

    def get(kind: str) -> nn.Module:
        if kind not in cache:
            lm = mp.load(copy.deepcopy(fp32))
            mp.compress(lm, BASES[kind], calib=CALIB, progress=False)
            cache[kind] = lm.module
        return copy.deepcopy(cache[kind])

    return get


def logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def train(pm, steps: int = 4, lr: float = 1e-2):
    return train_adapter(pm, TRAIN, TrainConfig(steps=steps, batch_size=4, lr=lr, warmup=0.0, log_every=1),
                         progress=False)


def randomise_adapter(pm, seed: int = 0) -> None:
    """Non-zero B (PEFT starts it at zero) so the formulas below test the adapter's path too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "lora_magnitude_vector" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's tensors by their own names (PEFT moves a wrapped layer's under ``base_layer``)."""
    return {k.replace(".base_layer", ""): v.clone() for k, v in model.state_dict().items()
            if not any(a in k for a in ("lora_", "vera_", "ia3_"))}


# ---- the qlora-nf4 base ------------------------------------------------------------------------------
def test_qlora_nf4_recipe_is_double_quantised_nf4_block_64(fp32, quantised):
    model = quantised("nf4")
    qs = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(qs) == 14 and not isinstance(model.lm_head, QuantLinear)
    fmt = NF4Format(granularity=PerGroup(size=64), double_quant=True)
    for n, q in qs.items():
        assert q.fmt == fmt, n
        W = fp32.get_submodule(n).weight.detach()
        torch.testing.assert_close(q.dequantized_weight(), fmt.quantize(W).dequantize(), rtol=0, atol=0)


# ---- LoRA / DoRA on quantised layers: the formulas -------------------------------------------------------
def test_lora_on_nf4_is_base_plus_BA_and_gradients_reach_the_input(quantised):
    pm = attach(quantised("nf4"), AdapterConfig(method="lora", r=4, alpha=8, targets=("q_proj",)))
    randomise_adapter(pm)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    base = layer.get_base_layer()
    assert isinstance(base, QuantLinear)
    x = torch.randn(3, 5, 64, requires_grad=True)
    y = layer(x)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x2 = x.detach().clone().requires_grad_(True)
    W = base.dequantized_weight()  # (out, in)
    ref = F.linear(x2, W, base.bias) + x2 @ A.T @ B.T * (8 / 4)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)  # the frozen base re-dequantises in backward: same input gradient as the dense formula
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    assert not any(p.requires_grad for n, p in pm.named_parameters() if "lora_" not in n)


def test_dora_on_nf4_is_magnitude_times_normalised_direction(quantised):
    pm = attach(quantised("nf4"), AdapterConfig(method="dora", r=4, alpha=4, targets=("v_proj",)))
    randomise_adapter(pm)
    layer = pm.base_model.model.model.layers[1].self_attn.v_proj
    W = layer.get_base_layer().dequantized_weight()  # (out, in)
    dW = layer.lora_B["default"].weight @ layer.lora_A["default"].weight  # scaling alpha / r = 1
    m = layer.lora_magnitude_vector["default"].weight  # (out,)
    x = torch.randn(4, 64)
    ref = x @ ((m / torch.linalg.norm(W + dW, dim=1)).view(-1, 1) * (W + dW)).T
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref, rtol=1e-4, atol=1e-5)


# ---- training, PEFT's files, PeftModel.from_pretrained --------------------------------------------------
@pytest.mark.parametrize("kind,method", [("nf4", "lora"), ("nf4", "dora"), ("gptq", "lora"), ("awq", "lora"),
                                         ("hqq", "lora"), ("hqq", "dora")])
def test_trains_only_the_adapter_and_reloads_with_plain_peft(quantised, kind, method, tmp_path):
    model = quantised(kind)
    frozen = base_state(model)
    pm = attach(model, AdapterConfig(method=method, r=4))
    res = train(pm, steps=6)
    assert res.losses[-1][1] < res.losses[0][1] - 0.1, res.losses  # it learned the period-7 stream
    after = base_state(pm.base_model.model)
    assert frozen.keys() == after.keys() and all(torch.equal(frozen[k], after[k]) for k in frozen)  # packed, untouched
    pm.save_pretrained(str(tmp_path))
    back = peft.PeftModel.from_pretrained(quantised(kind), str(tmp_path))
    torch.testing.assert_close(logits(back), logits(pm), rtol=0, atol=0)
    assert not torch.allclose(logits(back), logits(quantised(kind)), atol=1e-3)  # the adapter does something


def test_nf4_adapter_loads_with_plain_peft_in_a_fresh_process(quantised, tmp_path):
    """The must-show: after ``import modelpress`` and loading our saved NF4 model, plain
    ``PeftModel.from_pretrained(model, adapter_dir)`` (no extra argument) gives the trained outputs."""
    lm = mp.load(quantised("nf4"))
    mp.save(lm, tmp_path / "base")
    pm = attach(lm.module, AdapterConfig(method="lora", r=4))
    train(pm)
    pm.save_pretrained(str(tmp_path / "adapter"))
    torch.save({"ids": IDS, "logits": logits(pm)}, tmp_path / "expected.pt")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and set(cfg["target_modules"]) >= {"q_proj", "down_proj"}
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors").keys()
    assert keys and all("lora_A" in k or "lora_B" in k for k in keys)  # the adapter only, no base weight
    script = textwrap.dedent(f"""
        import torch
        import modelpress as mp
        from peft import PeftModel
        lm = mp.load({str(tmp_path / 'base')!r})
        pm = PeftModel.from_pretrained(lm.module, {str(tmp_path / 'adapter')!r})
        exp = torch.load({str(tmp_path / 'expected.pt')!r})
        with torch.no_grad():
            out = pm(input_ids=exp["ids"]).logits
        layer = pm.base_model.model.model.layers[0].self_attn.q_proj
        print(type(layer).__name__, type(layer.get_base_layer()).__name__, float((out - exp["logits"]).abs().max()))
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    layer_type, base_type, diff = run.stdout.split()[-3:]
    assert (layer_type, base_type) == ("QuantLoraLinear", "QuantLinear") and float(diff) == 0.0


def test_after_import_registers_in_either_import_order(tmp_path, monkeypatch):
    """The hook behind the test above, on a stand-in library: run when it is imported later, or at
    once when it already is; and PEFT in this process knows our layers whichever came first."""
    from modelpress.core.import_hooks import after_import

    (tmp_path / "mp_fake_lib.py").write_text("VALUE = 7\n")
    (tmp_path / "mp_fake_hook.py").write_text("CALLS = []\ndef register():\n    import mp_fake_lib\n"
                                               "    CALLS.append(mp_fake_lib.VALUE)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("mp_fake_lib", "mp_fake_hook"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    after_import("mp_fake_lib", "mp_fake_hook", "register")
    hook = __import__("mp_fake_hook")
    assert hook.CALLS == [] and "mp_fake_lib" not in sys.modules  # nothing imported early
    __import__("mp_fake_lib")
    assert hook.CALLS == [7]
    after_import("mp_fake_lib", "mp_fake_hook", "register")  # already imported: runs now
    assert hook.CALLS == [7, 7]
    assert QuantLinear in peft.LoraConfig(target_modules=["q"])._custom_modules


# ---- merging into a quantised base --------------------------------------------------------------------
@pytest.mark.parametrize("kind,method", [("nf4", "lora"), ("gptq", "lora"), ("hqq", "dora")])
def test_merge_requantises_and_reports_the_error_it_adds(quantised, kind, method):
    pm = attach(quantised(kind), AdapterConfig(method=method, r=4))
    train(pm, steps=3, lr=3e-3)
    unmerged = copy.deepcopy(pm)
    expected = {}
    for n, layer in unmerged.named_modules():
        if hasattr(layer, "merge_errors"):  # W' recomputed here from the dequantised base and A, B (and m)
            base = layer.get_base_layer()
            W = base.dequantized_weight()
            dW = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
            Wm = W + dW
            if method == "dora":
                Wm = (layer.lora_magnitude_vector["default"].weight / torch.linalg.norm(W + dW, dim=1)).view(-1, 1) * Wm
            Wm = Wm.detach()  # the closer of the layer's own grid and a re-fitted one
            Q = min((base.fmt.quantize(Wm, stored=base.qtensor().params).dequantize(), base.fmt.quantize(Wm).dequantize()),
                    key=lambda q: float((q - Wm).norm()))
            expected[n] = (base.fmt, float((Q - Wm).norm() / Wm.norm()), float((Q - Wm).norm() / (Wm - W).norm()))
    merged, rep = merge_adapter(pm, IDS)
    assert rep.layer_errors.keys() == expected.keys() and len(expected) == 14
    for n, (fmt, w_err, d_err) in expected.items():
        q = merged.get_submodule(n.removeprefix("base_model.model."))
        assert isinstance(q, QuantLinear) and q.fmt == fmt  # re-quantised in the layer's own format
        assert rep.layer_errors[n]["weight"] == pytest.approx(w_err, rel=1e-4)
        assert rep.layer_errors[n]["delta"] == pytest.approx(d_err, rel=1e-4)
    y_ad, y_m = logits(unmerged), logits(merged)
    assert rep.output_rel_error == pytest.approx(float((y_m - y_ad).norm() / y_ad.norm()), rel=1e-5)
    # the merge keeps the adapted model: closer to it than the base without adapter is
    y_base = logits(quantised(kind))
    assert rep.output_rel_error < 0.5 * float((y_base - y_ad).norm() / y_ad.norm())
    assert not any("lora" in n for n, _ in merged.named_modules())


@pytest.mark.parametrize("kind", ["gptq", "hqq", "nf4"])
def test_merging_a_zero_adapter_leaves_the_base_codes(quantised, kind):
    """PEFT starts B at zero: merging re-quantises W itself, which the layer's own grid represents
    exactly, so every code stays (NF4's double-quantised absmax may move by float rounding only)."""
    base = quantised(kind)
    pm = attach(copy.deepcopy(base), AdapterConfig(method="lora", r=4))
    merged, rep = merge_adapter(pm, IDS)
    for n, q in base.named_modules():
        if isinstance(q, QuantLinear):
            W0, W1 = q.dequantized_weight(), merged.get_submodule(n).dequantized_weight()
            if kind == "nf4":
                torch.testing.assert_close(W1, W0, rtol=0, atol=1e-5)
            else:
                assert torch.equal(W1, W0), n
    assert rep.output_rel_error < (1e-5 if kind == "nf4" else 1e-7)


# ---- other PEFT methods on fp32 -------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["vera", "adalora", "ia3", "lora", "dora"])
def test_peft_methods_on_fp32_train_roundtrip_and_merge_exactly(fp32, method, tmp_path):
    model = copy.deepcopy(fp32)
    frozen = base_state(model)
    pm = attach(model, AdapterConfig(method=method, r=4, target_r=2), total_steps=8)
    before = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    res = train(pm, steps=8, lr=1e-2)
    assert res.losses[-1][1] < res.losses[0][1], res.losses
    moved = [n for n, p in pm.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert moved and all(any(k in n for k in ("lora_", "vera_", "ia3_")) for n in before)
    after = base_state(pm.base_model.model)
    assert all(torch.equal(frozen[k], after[k]) for k in frozen if k in after)
    pm.save_pretrained(str(tmp_path))
    back = peft.PeftModel.from_pretrained(copy.deepcopy(fp32), str(tmp_path))
    torch.testing.assert_close(logits(back), logits(pm), rtol=0, atol=1e-6)
    merged, rep = merge_adapter(pm, IDS)
    assert rep.output_rel_error < 1e-5 and not rep.layer_errors  # dense bases merge exactly
    assert all(type(m) is nn.Linear for n, m in merged.named_modules() if n.endswith("q_proj"))


# ---- refusals ------------------------------------------------------------------------------------------
def test_targets_that_do_not_exist_are_named_with_what_exists(fp32):
    with pytest.raises(ModelpressError, match=r"\['qproj'\] match no linear layer.*q_proj, up_proj, v_proj"):
        attach(copy.deepcopy(fp32), AdapterConfig(targets=("q_proj", "qproj")))
    with pytest.raises(ModelpressError, match=r"model.layers.0.mlp.* not a linear layer"):
        attach(copy.deepcopy(fp32), AdapterConfig(targets=("mlp",)))


@pytest.mark.parametrize("method", ["vera", "adalora", "ia3"])
def test_methods_peft_cannot_put_on_quantised_layers_are_refused(quantised, method):
    with pytest.raises(ModelpressError, match=rf"{method} cannot wrap a quantised layer \(QuantLinear at model\."):
        attach(quantised("nf4"), AdapterConfig(method=method), total_steps=10)


def test_merge_into_a_base_that_cannot_be_requantised_is_refused(fp32):
    lm = mp.load(copy.deepcopy(fp32))
    mp.compress(lm, {"name": "t", "stages": [{"method": "rtn", "ignore": ["lm_head"],
                                               "format": {"type": "int", "bits": 4, "granularity": 64}},
                                              {"method": "eora", "ignore": ["lm_head"], "rank": 4}]},
                calib=CALIB, progress=False)
    pm = attach(lm.module, AdapterConfig(method="lora", r=4, targets=("q_proj",)))
    assert isinstance(pm.base_model.model.model.layers[0].self_attn.q_proj.get_base_layer(), CompensatedLinear)
    randomise_adapter(pm)
    y = logits(pm)
    with pytest.raises(ModelpressError, match=r"cannot merge an adapter into a CompensatedLinear .*cannot be re-quantised"):
        merge_adapter(pm, IDS)
    torch.testing.assert_close(logits(pm), y, rtol=0, atol=0)  # refused before anything changed
    with pytest.raises(ModelpressError, match="cannot be re-quantised"):
        pm.merge_and_unload()  # PEFT's own entry point refuses too
    merged, rep = merge_adapter(pm, IDS, dense=True)  # what the refusal offers: dense W + dW, exact
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear and rep.output_rel_error < 1e-6


def test_dense_merge_is_W_plus_delta_exactly(quantised):
    pm = attach(quantised("nf4"), AdapterConfig(method="lora", r=4, alpha=8, targets=("up_proj",)))
    randomise_adapter(pm)
    layer = pm.base_model.model.model.layers[1].mlp.up_proj
    expected = layer.get_base_layer().dequantized_weight() + \
        layer.lora_B["default"].weight @ layer.lora_A["default"].weight * 2.0
    merged, rep = merge_adapter(pm, IDS, dense=True)
    lin = merged.model.layers[1].mlp.up_proj
    assert type(lin) is nn.Linear and not rep.layer_errors
    torch.testing.assert_close(lin.weight, expected, rtol=0, atol=1e-7)
    assert rep.output_rel_error < 1e-6
    assert isinstance(merged.model.layers[1].mlp.down_proj, QuantLinear)  # not adapted: still packed


# ---- the command ---------------------------------------------------------------------------------------
def test_cli_adapt_writes_peft_files_and_merges(tiny_llama_dir, tiny_text_file, tmp_path):
    from modelpress.cli.main import main

    assert main(["--quiet", "compress", "--model", str(tiny_llama_dir), "--recipe", "qlora-nf4",
                 "--output", str(tmp_path / "nf4")]) == 0
    out = tmp_path / "adapter"
    assert main(["--quiet", "adapt", "--model", str(tmp_path / "nf4"), "--data", str(tiny_text_file), "--steps", "3",
                 "--batch-size", "2", "--seq-len", "32", "--output", str(out), "--merge"]) == 0
    assert {"adapter_config.json", "adapter_model.safetensors", "adapt_report.json"} <= {p.name for p in out.iterdir()}
    rep = json.loads((out / "adapt_report.json").read_text())
    assert rep["result"]["tokens"] == 3 * 2 * 32 and rep["result"]["cpu_s"] > 0
    assert rep["merge"]["requantised_layers"] == 14
    merged = mp.load(out / "merged").module
    assert isinstance(merged.model.layers[0].mlp.up_proj, QuantLinear)
    assert main(["--quiet", "adapt", "--model", str(tmp_path / "nf4"), "--data", str(tiny_text_file), "--steps", "1",
                 "--targets", "nope", "--output", str(tmp_path / "bad")]) == 2
