"""Deja Vu-style contextual MLP sparsity (Liu et al., 2023): predict the active neurons, compute only those.

For an MLP ``y = W_down (act(W_gate x) * W_up x)`` the neurons that matter for a token are those
with the largest ``|act(gate_i) * up_i|``. A small low-rank MLP ``P(x) = W2 relu(W1 x)`` trained on
calibration tokens predicts them from the MLP input; at inference only the ``k`` predicted neurons
are computed: rows ``J`` of ``W_gate``/``W_up`` and columns ``J`` of ``W_down``.

The training and selection maths are plain functions; :class:`DejaVuMLP` is the module wrapper.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...core.errors import ModelpressError
from ...core.layers import SAVED_LAYERS
from ...models.layers import linear_shape


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(n, I) bool: the ``k`` largest entries of each row of ``scores``."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(-1, scores.topk(k, dim=-1).indices, True)


def neuron_scores(gate: nn.Module | None, up: nn.Module, x: torch.Tensor,
                  act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """(n, I) ``|act(gate x) * up x|`` (or ``|act(up x)|`` without a gate): each neuron's true magnitude."""
    h = act(gate(x)) * up(x) if gate is not None else act(up(x))
    return h.abs()


def train_predictor(x: torch.Tensor, labels: torch.Tensor, rank: int, *, epochs: int = 4, lr: float = 1e-3,
                    batch: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit ``W1`` (rank, d), ``W2`` (I, rank) so that ``W2 relu(W1 x)`` scores the labelled neurons highest.

    Binary cross-entropy against ``labels`` (n, I) bool (the true top-k), Adam, mini-batches.
    """
    g = torch.Generator().manual_seed(seed)
    d, n_neurons = x.shape[1], labels.shape[1]
    w1 = (torch.randn(rank, d, generator=g) / d ** 0.5).requires_grad_()
    w2 = (torch.randn(n_neurons, rank, generator=g) / rank ** 0.5).requires_grad_()
    opt = torch.optim.Adam([w1, w2], lr=lr)
    with torch.enable_grad():
        for _ in range(epochs):
            for idx in torch.randperm(x.shape[0], generator=g).split(batch):
                logits = F.relu(x[idx] @ w1.T) @ w2.T  # (b, I)
                loss = F.binary_cross_entropy_with_logits(logits, labels[idx].float())
                opt.zero_grad()
                loss.backward()
                opt.step()
    return w1.detach(), w2.detach()


def recall(pred: torch.Tensor, true: torch.Tensor) -> float:
    """|pred ∩ true| / |true| over all tokens (both (n, I) bool)."""
    return float((pred & true).sum()) / max(int(true.sum()), 1)


class Selector(Protocol):
    """Chooses the neurons to compute: (mlp, x (n, d)) -> (n, I) bool."""

    def __call__(self, mlp: "DejaVuMLP", x: torch.Tensor) -> torch.Tensor: ...


class PredictorTopK:
    """The learned low-rank predictor's top ``mlp.k`` neurons (the Deja Vu path)."""

    def __call__(self, mlp: "DejaVuMLP", x: torch.Tensor) -> torch.Tensor:
        logits = F.relu(x @ mlp.pred_w1.T.to(x.dtype)) @ mlp.pred_w2.T.to(x.dtype)  # (n, I)
        return topk_mask(logits, mlp.k)


class OracleTopK:
    """The true top ``mlp.k`` neurons (quality upper bound of any predictor with the same k)."""

    def __call__(self, mlp: "DejaVuMLP", x: torch.Tensor) -> torch.Tensor:
        return topk_mask(neuron_scores(mlp.gate_proj, mlp.up_proj, x, mlp.act_fn), mlp.k)


class OracleActive:
    """Every neuron whose activation is non-zero (with ReLU-like activations the others contribute nothing)."""

    def __call__(self, mlp: "DejaVuMLP", x: torch.Tensor) -> torch.Tensor:
        return neuron_scores(mlp.gate_proj, mlp.up_proj, x, mlp.act_fn) != 0


@SAVED_LAYERS.register("dejavu_mlp")
class DejaVuMLP(nn.Module):
    """A gated (or plain) MLP that computes only the neurons its selector picks for each token.

    Keeps the original ``gate_proj`` / ``up_proj`` / ``down_proj`` children (same state-dict names as
    the model's MLP) plus the predictor's ``pred_w1`` (rank, d) and ``pred_w2`` (I, rank). Counts
    measured skipped multiply-adds (``skipped_macs``) and the predictor's cost (``overhead_macs``).

    Example:
        >>> mlp = DejaVuMLP(nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8), "silu",
        ...                 torch.randn(4, 8), torch.randn(16, 4), k=6)
        >>> mlp(torch.randn(2, 3, 8)).shape
        torch.Size([2, 3, 8])
    """

    layer_tag = "dejavu_mlp"
    transforms_activations = True  # unpredicted hidden neurons are zeroed (core.layers)

    def __init__(self, gate_proj: nn.Module | None, up_proj: nn.Module, down_proj: nn.Module, hidden_act: str,
                 pred_w1: torch.Tensor, pred_w2: torch.Tensor, k: int) -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.hidden_act, self.act_fn = hidden_act, ACT2FN[hidden_act]
        self.n_neurons, self.d_in = linear_shape(up_proj)
        if not 0 < k <= self.n_neurons:
            raise ModelpressError(f"Deja Vu keeps k={k} neurons of {self.n_neurons}: k must be in [1, {self.n_neurons}]")
        self.k = int(k)
        self.register_buffer("pred_w1", pred_w1.detach().float().contiguous())
        self.register_buffer("pred_w2", pred_w2.detach().float().contiguous())
        self.selector: Selector = PredictorTopK()
        self.reset_counters()

    def reset_counters(self) -> None:
        """Zero the measured counts (selected / total neurons, skipped / dense / overhead MACs)."""
        self.selected, self.neurons, self.skipped_macs, self.dense_macs, self.overhead_macs = 0, 0, 0, 0, 0

    def macs_per_neuron(self) -> int:
        """Multiply-adds one neuron costs per token: its gate and up rows and its down column."""
        d_out = linear_shape(self.down_proj)[0]
        return self.d_in * (2 if self.gate_proj is not None else 1) + d_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., d)
        X = x.reshape(-1, x.shape[-1])  # (n, d)
        mask = self.selector(self, X)  # (n, I) bool
        self._count(mask)
        if X.shape[0] == 1 and self._plain():
            Y = self._gathered(X, mask[0].nonzero().squeeze(1))
        else:
            h = self.act_fn(self.gate_proj(X)) * self.up_proj(X) if self.gate_proj is not None else self.act_fn(self.up_proj(X))
            Y = self.down_proj(h * mask)  # unselected neurons contribute exactly nothing
        return Y.reshape(*x.shape[:-1], Y.shape[-1])

    def _count(self, mask: torch.Tensor) -> None:
        n, kept = mask.shape[0], int(mask.sum())
        self.selected += kept
        self.neurons += mask.numel()
        self.skipped_macs += (mask.numel() - kept) * self.macs_per_neuron()
        self.dense_macs += mask.numel() * self.macs_per_neuron()
        if isinstance(self.selector, PredictorTopK):
            self.overhead_macs += n * self.pred_w1.shape[0] * (self.d_in + self.n_neurons)

    def _plain(self) -> bool:
        mods = [m for m in (self.gate_proj, self.up_proj, self.down_proj) if m is not None]
        return all(isinstance(m, nn.Linear) for m in mods)

    def _gathered(self, X: torch.Tensor, J: torch.Tensor) -> torch.Tensor:
        """One token: read only rows ``J`` of gate/up and columns ``J`` of down (what a sparse kernel reads)."""
        u = F.linear(X, self.up_proj.weight[J], _rows(self.up_proj.bias, J))  # (1, |J|)
        if self.gate_proj is not None:
            h = self.act_fn(F.linear(X, self.gate_proj.weight[J], _rows(self.gate_proj.bias, J))) * u
        else:
            h = self.act_fn(u)
        return F.linear(h, self.down_proj.weight[:, J], self.down_proj.bias)  # (1, d_out)

    def manifest_entry(self) -> dict[str, Any]:
        return {"hidden_act": self.hidden_act, "k": self.k, "gated": self.gate_proj is not None,
                "shapes": {n: list(linear_shape(m)) for n, m in self._linears().items()},
                "bias": {n: getattr(m, "bias", None) is not None for n, m in self._linears().items()}}

    def _linears(self) -> dict[str, nn.Module]:
        return {n: m for n, m in (("gate_proj", self.gate_proj), ("up_proj", self.up_proj),
                                  ("down_proj", self.down_proj)) if m is not None}

    @classmethod
    def from_saved(cls, info: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "DejaVuMLP":
        """Rebuild around empty ``nn.Linear`` layers of the saved shapes; the saver loads (or replaces) the children."""
        lin = {n: nn.Linear(s[1], s[0], bias=info["bias"][n]) for n, s in info["shapes"].items()}
        return cls(lin.get("gate_proj"), lin["up_proj"], lin["down_proj"], info["hidden_act"],
                   tensors["pred_w1"], tensors["pred_w2"], info["k"])

    def extra_repr(self) -> str:
        return f"k={self.k}/{self.n_neurons}, rank={self.pred_w1.shape[0]}, selector={type(self.selector).__name__}"


def _rows(bias: torch.Tensor | None, J: torch.Tensor) -> torch.Tensor | None:
    return None if bias is None else bias[J]
