"""Budgeted allocation, solved exactly: one choice per layer, least predicted loss, within a budget.

The problem is a multiple-choice knapsack. With ``x[l, k]`` = 1 when layer ``l`` takes choice ``k``::

    minimise    sum_lk loss[l, k] x[l, k]
    subject to  sum_k x[l, k] = 1            for every layer l
                sum_lk cost[l, k] x[l, k] <= limit
                x binary

which :func:`scipy.optimize.milp` (HiGHS branch and bound) solves to optimality; the predicted
loss is the sum of per-layer measured sensitivities (:mod:`.sensitivity`), additive to second
order. Budgets are typed: bytes (as our size accounting counts them), average bits per weight,
average sparsity, or a latency table. The result is emitted as an ordinary recipe: one stage of
the choice's method per distinct choice, targeting the layers given it by name.

Example:
    >>> import numpy as np
    >>> a = solve_allocation(np.array([[3.0, 1.0], [2.0, 0.0]]), np.array([[1, 2], [1, 2]]), 3)
    >>> a.choice, a.objective
    ((0, 1), 3.0)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from ..core.errors import ModelpressError
from .choices import Choice

if TYPE_CHECKING:
    from .sensitivity import SensitivityTable

#: The solver's objective is scaled so its largest coefficient is this: HiGHS stops within an
#: absolute gap of 1e-6, which must be negligible against the loss differences it ranks.
OBJECTIVE_SCALE = 1e6


class InfeasibleBudget(ModelpressError):
    """No allocation meets the budget; ``smallest`` is the smallest budget one does."""

    def __init__(self, limit: float, smallest: float, unit: str) -> None:
        super().__init__(f"budget of {limit:.6g} {unit} cannot be met: the smallest feasible budget is "
                         f"{smallest:.6g} {unit} (every layer at its cheapest choice)")
        self.limit, self.smallest = limit, smallest


@dataclass(frozen=True)
class Allocation:
    """The solver's answer: the chosen index per layer, its predicted loss and cost."""

    choice: tuple[int, ...]
    objective: float
    cost: float
    limit: float


def solve_allocation(loss: np.ndarray, cost: np.ndarray, limit: float, unit: str = "") -> Allocation:
    """The exact minimum of ``sum loss[l, choice[l]]`` with ``sum cost[l, choice[l]] <= limit``.

    Args:
        loss: (layers, choices) predicted loss of each choice; ``inf`` or ``nan`` marks a choice
            the layer may not take.
        cost: (layers, choices) cost in the budget's unit.
        limit: the budget.
    Raises:
        InfeasibleBudget: naming the smallest feasible budget.
    """
    loss, cost = np.asarray(loss, dtype=np.float64), np.asarray(cost, dtype=np.float64)
    allowed = np.isfinite(loss)
    if loss.ndim != 2 or cost.shape != loss.shape or not allowed.any(1).all():
        raise ModelpressError(f"allocation needs (layers, choices) loss and cost with a choice per layer; got "
                              f"{loss.shape} and {cost.shape}")
    smallest = float(np.where(allowed, cost, np.inf).min(1).sum())
    if smallest > limit:
        raise InfeasibleBudget(limit, smallest, unit)
    rhs = float(limit)
    for _ in range(8):  # the solver's feasibility tolerance may overspend by a hair: tighten and resolve
        pick = _milp(loss, cost, allowed, rhs)
        spent = float(cost[np.arange(len(pick)), pick].sum())
        if spent <= limit:
            return Allocation(tuple(int(k) for k in pick), float(loss[np.arange(len(pick)), pick].sum()), spent, limit)
        rhs -= max(spent - limit, 1e-9 * abs(limit))
    raise ModelpressError(f"the MILP solver kept overspending the budget {limit:.6g} {unit} (last {spent:.6g})")


def _milp(loss: np.ndarray, cost: np.ndarray, allowed: np.ndarray, rhs: float) -> np.ndarray:
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import kron, csr_array

    L, K = loss.shape
    c = np.where(allowed, loss, 0.0)
    c = c - c.min(1, keepdims=True)  # a constant per layer does not move the optimum (one choice each)
    c *= OBJECTIVE_SCALE / max(float(c.max()), 1e-300)
    # costs relative to the budget keep the constraint's tolerance relative too
    scale = max(abs(rhs), float(np.abs(cost).max()), 1e-300)
    one_each = csr_array(kron(np.eye(L), np.ones((1, K))))  # (L, L*K)
    cons = [LinearConstraint(one_each, 1, 1), LinearConstraint((cost / scale).reshape(1, -1), -np.inf, rhs / scale)]
    res = milp(c.ravel(), constraints=cons, integrality=np.ones(L * K), bounds=Bounds(0, allowed.ravel().astype(float)),
               options={"mip_rel_gap": 0.0})
    if res.x is None:
        raise ModelpressError(f"the MILP solver found no allocation: {res.message}")
    return res.x.reshape(L, K).argmax(1)


# ---- budgets ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ByteBudget:
    """At most ``limit`` stored bytes over the allocated layers (packed codes + scales, or bitmask +
    kept values, or factors: what the report and the saved files count)."""

    limit: float
    unit: str = field(default="bytes", init=False)

    def costs(self, table: "SensitivityTable") -> np.ndarray:
        return table.nbytes.astype(np.float64)

    def bound(self, table: "SensitivityTable") -> float:
        return float(self.limit)


@dataclass(frozen=True)
class BitsBudget:
    """An average of at most ``bits_per_weight`` stored bits per weight (scales included), i.e.
    ``bits_per_weight / 8 * weights`` bytes."""

    bits_per_weight: float
    unit: str = field(default="bytes", init=False)

    def costs(self, table: "SensitivityTable") -> np.ndarray:
        return table.nbytes.astype(np.float64)

    def bound(self, table: "SensitivityTable") -> float:
        return self.bits_per_weight / 8 * float(table.numel.sum())


@dataclass(frozen=True)
class SparsityBudget:
    """An average sparsity of at least ``sparsity`` over the allocated layers' weights."""

    sparsity: float
    unit: str = field(default="weights kept", init=False)

    def costs(self, table: "SensitivityTable") -> np.ndarray:
        return table.kept.astype(np.float64)

    def bound(self, table: "SensitivityTable") -> float:
        return (1.0 - self.sparsity) * float(table.numel.sum())


@dataclass(frozen=True)
class LatencyBudget:
    """At most ``seconds`` summed over a measured table ``{layer: {choice label: seconds}}``."""

    seconds: float
    table: dict[str, dict[str, float]]
    unit: str = field(default="s", init=False)

    def costs(self, table: "SensitivityTable") -> np.ndarray:
        try:
            return np.array([[self.table[n][c.label] for c in table.choices] for n in table.layers])
        except KeyError as e:
            raise ModelpressError(f"latency table has no entry {e.args[0]!r}: it needs every layer and choice "
                                  f"label ({', '.join(c.label for c in table.choices)})") from None

    def bound(self, table: "SensitivityTable") -> float:
        return float(self.seconds)


Budget = Union[ByteBudget, BitsBudget, SparsityBudget, LatencyBudget]


def allocate(table: "SensitivityTable", budget: Budget) -> Allocation:
    """The allocation of least summed measured sensitivity that meets ``budget``."""
    return solve_allocation(table.measured, budget.costs(table), budget.bound(table), budget.unit)


def allocation_recipe(table: "SensitivityTable", alloc: Allocation, name: str = "allocated",
                      description: str = "") -> dict[str, Any]:
    """An ordinary recipe: one stage per distinct choice, ``targets`` the layers given it by name.

    Stages come in the table's order of choices; layers a choice does not change are left out.
    """
    stages = []
    for k, c in enumerate(table.choices):
        names = [n for n, pick in zip(table.layers, alloc.choice) if pick == k]
        if names:
            stages.append(c.stage(names))
    return {"name": name, "description": description or summary(table, alloc), "stages": stages}


def summary(table: "SensitivityTable", alloc: Allocation) -> str:
    """One line: how many layers took each choice, the cost against the budget, the predicted loss."""
    counts = {c.label: sum(1 for p in alloc.choice if p == k) for k, c in enumerate(table.choices)}
    parts = ", ".join(f"{lab} x{n}" for lab, n in counts.items() if n)
    return (f"allocated from measured sensitivity: {parts}; cost {alloc.cost:.6g} of {alloc.limit:.6g}; "
            f"predicted KL {alloc.objective:.4g} nats/token")


def chosen(table: "SensitivityTable", alloc: Allocation) -> list[Choice]:
    return [table.choices[k] for k in alloc.choice]
