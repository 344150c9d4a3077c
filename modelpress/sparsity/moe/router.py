"""A router that keeps every original expert's row but sends its tokens to the merged expert.

After merging, expert ``e``'s tokens go to ``expert_map[e]``. Routing decisions and weights stay
exactly those of the original router (same logits, same softmax, same top-k); only the index
changes, so two slots of one token may land on the same merged expert and simply add up.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...core.layers import SAVED_LAYERS


@SAVED_LAYERS.register("moe_remapped_router")
class RemappedRouter(nn.Module):
    """Softmax router over the original experts, top-k renormalised, indices mapped to merged experts.

    Returns ``(logits, weights, indices)`` like the transformers top-k routers (Mixtral family).

    Example:
        >>> r = RemappedRouter(torch.randn(4, 8), torch.tensor([0, 0, 1, 2]), top_k=2)
        >>> [t.shape for t in r(torch.randn(5, 8))]
        [torch.Size([5, 4]), torch.Size([5, 2]), torch.Size([5, 2])]
    """

    layer_tag = "moe_remapped_router"

    def __init__(self, weight: torch.Tensor, expert_map: torch.Tensor, top_k: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)  # (E_original, d)
        self.register_buffer("expert_map", expert_map.detach().long().clone())  # (E_original,)
        self.top_k = int(top_k)
        self.num_experts = int(expert_map.max()) + 1  # merged experts
        self.hidden_dim = weight.shape[1]

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = hidden_states.reshape(-1, self.hidden_dim)  # (n, d)
        logits = F.linear(x, self.weight)  # (n, E_original)
        probs = torch.softmax(logits.float(), dim=-1)
        top, idx = torch.topk(probs, self.top_k, dim=-1)  # (n, k)
        top = top / top.sum(dim=-1, keepdim=True)
        return logits, top, self.expert_map[idx]

    def manifest_entry(self) -> dict[str, Any]:
        return {"top_k": self.top_k, "shape": list(self.weight.shape)}

    @classmethod
    def from_saved(cls, info: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "RemappedRouter":
        return cls(tensors["weight"], tensors["expert_map"], info["top_k"])

    def extra_repr(self) -> str:
        return f"original_experts={self.weight.shape[0]}, merged_experts={self.num_experts}, top_k={self.top_k}"
