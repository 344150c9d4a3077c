"""Expert usage, pruning and merging: tensors in, tensors out.

Experts are stored fused (``MoESpec.expert_params``: one tensor per weight, expert on axis 0) and
routed by a linear router whose row ``e`` scores expert ``e``. Everything here is independent of
the model family; :mod:`.method` finds the tensors through the ArchSpec.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ExpertUsage:
    """Routing statistics of one MoE layer over calibration tokens.

    ``tokens[e]``: tokens that chose expert ``e`` in their top-k; ``weight_sum[e]``: sum of the routing
    weights it received; ``prob_sum[e]``: sum of its softmax probability over *all* tokens.
    """

    num_experts: int
    tokens: torch.Tensor = field(init=False)  # (E,) int64
    weight_sum: torch.Tensor = field(init=False)  # (E,) float64
    prob_sum: torch.Tensor = field(init=False)  # (E,) float64
    n_tokens: int = 0

    def __post_init__(self) -> None:
        self.tokens = torch.zeros(self.num_experts, dtype=torch.int64)
        self.weight_sum = torch.zeros(self.num_experts, dtype=torch.float64)
        self.prob_sum = torch.zeros(self.num_experts, dtype=torch.float64)

    def update(self, logits: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> None:
        """Add one router call: logits (n, E), top-k weights (n, k), top-k indices (n, k)."""
        idx = indices.reshape(-1).long().cpu()
        self.tokens += torch.bincount(idx, minlength=self.num_experts)
        self.weight_sum.index_add_(0, idx, weights.reshape(-1).double().cpu())
        self.prob_sum += torch.softmax(logits.double(), -1).sum(0).cpu()
        self.n_tokens += logits.shape[0]

    @property
    def mean_weight(self) -> torch.Tensor:
        """Mean routing weight per routed token (0 for an expert that saw none)."""
        return torch.where(self.tokens > 0, self.weight_sum / self.tokens.clamp_min(1), 0.0)

    def unused(self) -> list[int]:
        return [int(e) for e in (self.tokens == 0).nonzero().flatten()]

    def to_dict(self) -> dict[str, list]:
        return {"tokens": self.tokens.tolist(), "mean_weight": [round(float(w), 6) for w in self.mean_weight],
                "mean_prob": [round(float(p) / max(self.n_tokens, 1), 6) for p in self.prob_sum]}


def least_used(usage: ExpertUsage, n_drop: int) -> list[int]:
    """The ``n_drop`` experts with fewest routed tokens (ties: smaller total probability first)."""
    order = sorted(range(usage.num_experts), key=lambda e: (int(usage.tokens[e]), float(usage.prob_sum[e])))
    return sorted(order[:n_drop])


def cosine_similarity_matrix(outputs: torch.Tensor) -> torch.Tensor:
    """(E, E) cosine similarity of the experts' flattened outputs ``outputs`` (E, n, d)."""
    flat = outputs.reshape(outputs.shape[0], -1).double()
    flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return flat @ flat.T


def cluster_experts(sim: torch.Tensor, n_clusters: int) -> list[list[int]]:
    """Average-linkage agglomerative clustering of experts into ``n_clusters`` groups (most similar first)."""
    groups = [[e] for e in range(sim.shape[0])]
    while len(groups) > n_clusters:
        best, pair = -float("inf"), (0, 1)
        for i in range(len(groups)):
            for j in range(i + 1, len(groups)):
                s = float(sim[groups[i]][:, groups[j]].mean())
                if s > best:
                    best, pair = s, (i, j)
        i, j = pair
        groups[i] = sorted(groups[i] + groups.pop(j))
    return sorted(groups)


def merge_weights(usage: torch.Tensor, group: list[int]) -> tuple[torch.Tensor, bool]:
    """(len(group),) merging coefficients proportional to usage; uniform (and True) when the group saw no token."""
    u = usage[group].double()
    if float(u.sum()) == 0.0:
        return torch.full((len(group),), 1.0 / len(group), dtype=torch.float64), True
    return u / u.sum(), False


def merge_stacked(param: torch.Tensor, groups: list[list[int]], coeffs: list[torch.Tensor]) -> torch.Tensor:
    """(len(groups), ...) from ``param`` (E, ...): each group's slices averaged with its coefficients."""
    out = [torch.einsum("g,g...->...", c.to(param.dtype), param[g]) for g, c in zip(groups, coeffs)]
    return torch.stack(out)
