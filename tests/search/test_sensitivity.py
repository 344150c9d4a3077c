"""Measured sensitivity against independent recomputation, the proxy and its rank correlation, the
allocation stages (bytes of mixed-w3 = bytes of gptq-w3-g64), and the CLI round trip."""
from __future__ import annotations

import argparse
import copy

import numpy as np
import pytest
import torch
import yaml

import modelpress as mp
from modelpress.quant.qlinear import QuantLinear
from modelpress.search.allocate import BitsBudget, InfeasibleBudget, allocate, allocation_recipe
from modelpress.search.choices import QuantChoice, RankChoice, SparsityChoice
from modelpress.search.sensitivity import SensitivityTable, measure_sensitivity, spearman
from tests.conftest import make_tiny_llama

LAYERS = ["model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"]


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    return make_tiny_llama(layers=2, hidden=64, inter=128)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(2, 300, (2, 24), generator=torch.Generator().manual_seed(0))


def full_model_kl(model: torch.nn.Module, name: str, W: torch.Tensor, ids: torch.Tensor) -> float:
    """KL(float || model with ``name``'s weight replaced by W), by two plain full forwards."""
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
        m = copy.deepcopy(model)
        m.get_submodule(name).weight.data = W.clone()
        lq = torch.log_softmax(m(input_ids=ids).logits.float(), -1)
    return float((ref.exp() * (ref - lq)).sum(-1).mean())


def layer_inputs(model: torch.nn.Module, name: str, ids: torch.Tensor) -> torch.Tensor:
    """The float inputs the layer sees, (tokens, in), by a hook on a plain full forward."""
    seen = []
    h = model.get_submodule(name).register_forward_pre_hook(lambda _m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=ids)
    h.remove()
    return torch.cat(seen)


def test_measured_kl_and_proxy_equal_an_independent_recomputation(base, ids) -> None:
    choices = [QuantChoice(2, algorithm="rtn"), SparsityChoice(0.5, "wanda"), RankChoice(4)]
    stats = torch.randint(2, 300, (3, 40), generator=torch.Generator().manual_seed(5))  # Hessians from other tokens
    table = measure_sensitivity(mp.load(copy.deepcopy(base)), ids, choices, stats_ids=stats, targets=LAYERS)
    assert table.layers == LAYERS and table.info["hessian_tokens"] == 120
    for i, name in enumerate(LAYERS):
        W = base.get_submodule(name).weight.detach().float()
        X = layer_inputs(base, name, stats)  # (tokens, in)
        H = 2 * X.T.double() @ X.double() / X.shape[0]
        for k, c in enumerate(choices):
            Wp = c.perturb(W, H.float()).W
            assert table.measured[i, k] == pytest.approx(full_model_kl(base, name, Wp, ids), rel=2e-3, abs=1e-7)
            E = (W - Wp).double()
            assert table.proxy[i, k] == pytest.approx(float(2 * (E @ X.T.double()).pow(2).sum() / X.shape[0]), rel=1e-3)
    assert (table.measured > 0).all()
    q = QuantChoice(2, algorithm="rtn").format().quantize(base.get_submodule(LAYERS[0]).weight.detach().float())
    assert table.nbytes[0, 0] == q.nbytes()  # what the size accounting stores for that layer
    assert table.kept[0, 1] == base.get_submodule(LAYERS[0]).weight.numel() // 2


def test_more_compression_costs_more(base, ids) -> None:
    table = measure_sensitivity(mp.load(copy.deepcopy(base)), ids, [QuantChoice(b) for b in (2, 4, 8)])
    assert (table.measured[:, 0] > table.measured[:, 2]).all()  # 2-bit hurts every layer more than 8-bit
    assert table.measured[:, 1].sum() > table.measured[:, 2].sum()


def reference_spearman(a: list[float], b: list[float]) -> float:
    """Spearman by the textbook definition: average ranks (ties share them), then Pearson, in pure Python."""
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for t in range(i, j + 1):
                r[order[t]] = (i + j) / 2 + 1
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5


def test_spearman_is_computed_correctly() -> None:
    rng = np.random.default_rng(1)
    a = rng.integers(0, 5, 40).astype(float)  # many ties
    b = a + rng.normal(0, 2, 40)
    assert spearman(a, b) == pytest.approx(reference_spearman(list(a), list(b)), abs=1e-12)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None  # no variation: undefined, not 0


def test_table_reports_and_round_trips_the_proxy_correlation(base, ids, tmp_path) -> None:
    table = measure_sensitivity(mp.load(copy.deepcopy(base)), ids, [QuantChoice(2), QuantChoice(3)])
    rho = table.spearman()
    assert rho["pooled"] == pytest.approx(reference_spearman(list(table.proxy.ravel()), list(table.measured.ravel())))
    assert rho["per_choice"]["w3g64"] == pytest.approx(reference_spearman(list(table.proxy[:, 1]),
                                                                          list(table.measured[:, 1])))
    table.save(tmp_path / "t.json")
    back = SensitivityTable.load(tmp_path / "t.json")
    assert back.layers == table.layers and back.choices == table.choices
    assert np.array_equal(back.measured, table.measured) and np.array_equal(back.nbytes, table.nbytes)


def quant_bytes(model: torch.nn.Module) -> dict[str, int]:
    return {n: m.stored_bytes() for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def test_mixed_w3_spends_exactly_the_bytes_of_gptq_w3_g64_and_matches_its_allocation(base) -> None:
    calib = torch.randint(2, 300, (4, 64), generator=torch.Generator().manual_seed(1))
    uni = mp.load(copy.deepcopy(base))
    mp.compress(uni, "gptq-w3-g64", calib=calib, progress=False)
    mixed = mp.load(copy.deepcopy(base))
    rep = mp.compress(mixed, "mixed-w3", calib=calib, progress=False)
    m = rep["stages"][0]["metrics"][0]
    ub, mb = quant_bytes(uni.module), quant_bytes(mixed.module)
    assert set(ub) == set(mb) and len(ub) == 14
    assert m["limit"] == sum(ub.values())  # the budget: uniform 3-bit g64's stored bytes, exactly
    assert sum(mb.values()) == m["cost"] <= m["limit"]
    labels = set(m["allocation"].values())
    assert len(labels) > 1  # it did allocate (not uniform 3-bit)
    for name, lab in m["allocation"].items():
        assert mixed.module.get_submodule(name).fmt.bits == int(lab[1])


def test_emitted_recipe_reproduces_the_builtin_stage(base, tmp_path) -> None:
    """``modelpress allocate``'s recipe on the same table gives the same model as the built-in stage."""
    calib = torch.randint(2, 300, (4, 64), generator=torch.Generator().manual_seed(2))
    builtin = mp.load(copy.deepcopy(base))
    mp.compress(builtin, "mixed-w3", calib=calib, progress=False)
    lm = mp.load(copy.deepcopy(base))
    table = measure_sensitivity(lm, calib[:1, :64], [QuantChoice(b) for b in (2, 3, 4)], stats_ids=calib)
    ref = QuantChoice(3)
    budget = sum(ref.nbytes(tuple(lm.module.get_submodule(n).weight.shape)) for n in table.layers)
    from modelpress.search.allocate import ByteBudget

    path = tmp_path / "mixed.yaml"
    path.write_text(yaml.safe_dump(allocation_recipe(table, allocate(table, ByteBudget(budget)), "m")))
    mp.compress(lm, str(path), calib=calib, progress=False)
    for name, q in quant_bytes(builtin.module).items():
        a, b = builtin.module.get_submodule(name), lm.module.get_submodule(name)
        assert a.fmt.bits == b.fmt.bits
        assert torch.equal(a.dequantized_weight(), b.dequantized_weight()), name


def test_mixed_sparsity_meets_the_average(base) -> None:
    calib = torch.randint(2, 300, (4, 64), generator=torch.Generator().manual_seed(3))
    lm = mp.load(copy.deepcopy(base))
    rep = mp.compress(lm, "mixed-sparse-60", calib=calib, progress=False)
    from modelpress.sparsity.layer import SparseLayer

    layers = [m for m in lm.module.modules() if isinstance(m, SparseLayer)]
    zeros, n = sum(int((~m.mask).sum()) for m in layers), sum(m.mask.numel() for m in layers)
    assert len(layers) == 14 and zeros / n >= 0.6 - 1e-9
    assert len({round(m.sparsity(), 2) for m in layers}) > 1
    assert rep["stages"][0]["metrics"][0]["cost"] == n - zeros


def test_an_unmeetable_budget_is_refused_with_the_smallest_feasible_one(base) -> None:
    calib = torch.randint(2, 300, (2, 32))
    recipe = {"stages": [{"method": "mixed-precision", "bits": [3, 4], "bits_per_weight": 2.5}]}
    with pytest.raises(InfeasibleBudget, match=r"smallest feasible budget is [0-9.]+ bytes"):
        mp.compress(mp.load(copy.deepcopy(base)), recipe, calib=calib, progress=False)
    with pytest.raises(Exception, match="exactly one budget"):
        mp.compress(mp.load(copy.deepcopy(base)), {"stages": [{"method": "mixed-precision"}]}, calib=calib)


def test_cli_sensitivity_then_allocate_writes_a_runnable_recipe(base, tmp_path, tiny_llama_dir) -> None:
    from modelpress.cli import allocate_cmd, sensitivity_cmd

    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd")
    sensitivity_cmd.add_parser(sub)
    allocate_cmd.add_parser(sub)
    text = tmp_path / "calib.txt"
    text.write_text("the robot counted the birds and the cat counted the trees. " * 40)
    sens = tmp_path / "s.json"
    args = ap.parse_args(["sensitivity", "--model", str(tiny_llama_dir), "--calib", str(text), "--calib-seq-len",
                          "32", "--calib-samples", "4", "--measure-tokens", "16", "--bits", "2", "4", "--algorithm", "rtn", "--json", str(sens)])
    assert sensitivity_cmd.cmd_sensitivity(args) == 0
    out = tmp_path / "r.yaml"
    assert allocate_cmd.cmd_allocate(ap.parse_args(["allocate", "--sensitivity", str(sens), "--budget-bpw", "3.25",
                                                    "--out", str(out)])) == 0
    assert SensitivityTable.load(sens).info["hessian_tokens"] == 4 * 32
    recipe = mp.as_recipe(str(out))
    assert {st.method for st in recipe.stages} == {"rtn"}
    lm = mp.load(tiny_llama_dir)
    mp.compress(lm, str(out), progress=False)
    nb = sum(quant_bytes(lm.module).values())
    assert nb <= 3.25 / 8 * sum(SensitivityTable.load(sens).numel)
    with pytest.raises(InfeasibleBudget, match="smallest feasible"):
        allocate_cmd.cmd_allocate(ap.parse_args(["allocate", "--sensitivity", str(sens), "--budget-bpw", "1",
                                                 "--out", str(out)]))
