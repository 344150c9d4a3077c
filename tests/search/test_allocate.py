"""The exact allocator: MILP answer = brute-force optimum; budgets; infeasible budgets; the recipe it emits."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from modelpress.pipeline.recipe import parse_recipe
from modelpress.search.allocate import (BitsBudget, ByteBudget, InfeasibleBudget, LatencyBudget, SparsityBudget,
                                        allocate, allocation_recipe, solve_allocation)
from modelpress.search.choices import QuantChoice, SparsityChoice
from modelpress.search.sensitivity import SensitivityTable


def brute_force(loss: np.ndarray, cost: np.ndarray, limit: float) -> float | None:
    """Least total loss over every feasible assignment (None when none is feasible)."""
    L, K = loss.shape
    best = None
    for pick in itertools.product(range(K), repeat=L):
        rows = np.arange(L)
        if not np.isfinite(loss[rows, pick]).all() or cost[rows, pick].sum() > limit:
            continue
        v = float(loss[rows, pick].sum())
        best = v if best is None or v < best else best
    return best


@pytest.mark.parametrize("seed", range(30))
def test_milp_matches_brute_force_on_random_problems(seed: int) -> None:
    rng = np.random.default_rng(seed)
    L, K = int(rng.integers(1, 7)), int(rng.integers(2, 5))
    cost = rng.integers(1, 50, size=(L, K)).astype(float) if seed % 2 else rng.uniform(0.1, 10, size=(L, K))
    loss = rng.exponential(1.0, size=(L, K)) * (10.0 ** rng.integers(-6, 2))  # tiny KLs as well as large ones
    if seed % 5 == 0:
        loss[rng.integers(0, L), rng.integers(0, K)] = np.inf  # a choice that layer may not take
    lo = np.where(np.isfinite(loss), cost, np.inf).min(1).sum()
    limit = float(lo + rng.uniform(0, 1) * (cost.max(1).sum() - lo))
    best = brute_force(loss, cost, limit)
    a = solve_allocation(loss, cost, limit)
    assert best is not None
    assert a.objective == pytest.approx(best, rel=1e-9, abs=1e-15)
    assert a.cost <= limit
    assert a.cost == pytest.approx(cost[np.arange(L), list(a.choice)].sum())
    assert a.objective == pytest.approx(loss[np.arange(L), list(a.choice)].sum())


def test_budget_binding_exactly_at_the_cheapest_allocation() -> None:
    loss = np.array([[5.0, 1.0], [4.0, 0.5], [3.0, 0.1]])
    cost = np.array([[1, 3], [1, 3], [1, 3]])
    a = solve_allocation(loss, cost, 3)  # only the all-cheapest allocation fits
    assert a.choice == (0, 0, 0) and a.cost == 3
    assert solve_allocation(loss, cost, 5).choice == (1, 0, 0)  # the 2 spare units buy the largest saving


def test_infeasible_budget_names_the_smallest_feasible_one() -> None:
    cost = np.array([[4, 2, 3], [7, 5, 6]])
    with pytest.raises(InfeasibleBudget, match=r"smallest feasible budget is 7 bytes") as e:
        solve_allocation(np.ones((2, 3)), cost, 6.5, "bytes")
    assert e.value.smallest == 7


def _table(choices: list, numel: list[int], measured: np.ndarray, nbytes: np.ndarray, kept: np.ndarray) -> SensitivityTable:
    layers = [f"model.layers.{i}.mlp.down_proj" for i in range(len(numel))]
    return SensitivityTable(layers, choices, np.array(numel), measured, measured * 2, nbytes, kept)


def test_budgets_turn_into_the_right_limits() -> None:
    t = _table([QuantChoice(2), QuantChoice(4)], [100, 300], np.array([[1.0, 0.1], [2.0, 0.2]]),
               np.array([[30, 55], [90, 165]]), np.array([[100, 100], [300, 300]]))
    assert BitsBudget(3.0).bound(t) == pytest.approx(3.0 / 8 * 400)
    assert ByteBudget(200).bound(t) == 200
    assert SparsityBudget(0.6).bound(t) == pytest.approx(0.4 * 400)
    a = allocate(t, BitsBudget(3.0))  # 150 bytes: 30 + 90 and 55 + 90 fit; the second loses less
    assert a.choice == (1, 0) and a.cost == 145
    with pytest.raises(InfeasibleBudget, match="smallest feasible budget is 120 bytes"):
        allocate(t, BitsBudget(2.0))
    lat = LatencyBudget(1.0, {n: {"w2g64": 0.3, "w4g64": 0.6} for n in t.layers})
    assert allocate(t, lat).choice == (0, 1)  # 0.9 s: only one layer may take the slow choice; the costlier one
    with pytest.raises(Exception, match="latency table has no entry"):
        allocate(t, LatencyBudget(1.0, {}))


def test_allocation_recipe_is_an_ordinary_recipe_covering_each_layer_once() -> None:
    choices = [SparsityChoice(0.5), SparsityChoice(0.6), SparsityChoice(0.8)]
    n = 6
    t = _table(choices, [64] * n, np.random.default_rng(0).uniform(size=(n, 3)), np.ones((n, 3)),
               np.array([[32, 26, 13]] * n))
    a = allocate(t, SparsityBudget(0.6))
    recipe = parse_recipe(allocation_recipe(t, a, "x"))  # validated like a YAML recipe
    got = {}
    for st in recipe.stages:
        assert st.method == "sparsegpt"
        for name in st.targets:
            assert name not in got
            got[name] = st.sparsity
    assert got == {name: choices[k].sparsity for name, k in zip(t.layers, a.choice)}
    assert sum(t.kept[i, k] for i, k in enumerate(a.choice)) <= 0.4 * 64 * n


def test_rank_and_quant_choices_emit_valid_stages() -> None:
    from modelpress.search.choices import RankChoice, choice_from_dict, choice_to_dict

    choices = [RankChoice(8), RankChoice(32), QuantChoice(4, algorithm="rtn")]
    t = _table(choices, [64 * 128] * 3, np.array([[3.0, 1.0, 0.5]] * 3), np.array([[1536, 6144, 8192]] * 3),
               np.array([[1536, 6144, 8192]] * 3))
    a = allocate(t, ByteBudget(1536 + 6144 + 8192))
    assert sorted(a.choice) == [0, 1, 2]  # one of each: the least loss (4.5) within 15,872 bytes
    assert a.objective == brute_force(t.measured, t.nbytes.astype(float), 1536 + 6144 + 8192) == 4.5
    recipe = parse_recipe(allocation_recipe(t, a))
    assert sorted(st.method for st in recipe.stages) == ["rtn", "svdllm", "svdllm"]
    assert {st.rank for st in recipe.stages if st.method == "svdllm"} == {8, 32}
    assert all(choice_from_dict(choice_to_dict(c)) == c for c in choices)
