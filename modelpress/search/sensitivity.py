"""Per-layer sensitivity: what compressing one layer alone costs the model, measured and by proxy.

Measured: for every targeted linear and every choice (a bit width, a sparsity, a rank), only that
layer is compressed and the KL divergence of the model's next-token distribution from the float
model's is measured on a small calibration batch (nats per token). KL rather than the loss
increase: it is never negative, has far less variance on a few hundred tokens (the float logits
are the reference on the same tokens), and is additive over layers to second order, which is what
the allocator's sum assumes.

Affordable on SmolLM2's 210 linears because nothing is run twice: one float pass caches each
block's input and the float log-probabilities; for a layer of block ``i`` only block ``i`` is run
per choice, and the choices' outputs go through blocks ``i+1 ..``, the final norm and the head
together as one batch. The layer's Hessian ``H = 2/n X^T X`` comes from a second, larger float
stream (``stats_ids``: the whole calibration set in the allocation stages), so GPTQ / SparseGPT /
SVD-LLM compress the layer as they would in a recipe. Not from the few measuring tokens: fitted
to exactly the tokens it is then measured on, GPTQ at 2 bits looks far better than it is (with 64
tokens and 576 columns it can cancel most of its error on them).

Proxy: ``tr((W - W') H (W - W')^T)``, the layer's output error on the calibration tokens (GPTQ's
and OBS's objective), which needs no forward pass; its Spearman rank correlation with the
measured values is reported, over all (layer, choice) cells and per choice across layers.

Example:
    >>> table = measure_sensitivity(lm, calib_ids[:2, :128], [QuantChoice(2), QuantChoice(3)])  # doctest: +SKIP
    >>> table.spearman()["pooled"]  # doctest: +SKIP
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn as nn

from ..calib.blocks import capture_first_block_inputs
from ..calib.capture import capture_inputs
from ..calib.stats import HessianAccumulator
from ..core.errors import ModelpressError
from ..core.selectors import select
from ..models.archspec import blocks_path, get_blocks, get_submodule, role_of
from ..models.layers import is_conv1d, named_linears
from ..models.loading import LoadedModel
from ..models.selection import layer_weight
from .choices import Choice, choice_from_dict, choice_to_dict


@dataclass
class SensitivityTable:
    """Per (layer, choice): measured KL (nats/token), proxy, stored bytes, weights kept.

    Arrays are (layers, choices); ``numel`` (layers,) the weights of each layer.
    """

    layers: list[str]
    choices: list[Choice]
    numel: np.ndarray
    measured: np.ndarray
    proxy: np.ndarray
    nbytes: np.ndarray
    kept: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    def spearman(self) -> dict[str, Any]:
        """Rank correlation of proxy and measured: over every cell, and per choice across layers."""
        per = {c.label: spearman(self.proxy[:, k], self.measured[:, k]) for k, c in enumerate(self.choices)}
        return {"pooled": spearman(self.proxy.ravel(), self.measured.ravel()), "per_choice": per}

    def to_dict(self) -> dict[str, Any]:
        return {"layers": self.layers, "choices": [choice_to_dict(c) for c in self.choices],
                "numel": self.numel.tolist(), "measured_kl": self.measured.tolist(), "proxy": self.proxy.tolist(),
                "nbytes": self.nbytes.tolist(), "kept": self.kept.tolist(), "spearman": self.spearman(),
                "info": self.info}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SensitivityTable":
        return cls(list(d["layers"]), [choice_from_dict(c) for c in d["choices"]], np.array(d["numel"], dtype=np.int64),
                   np.array(d["measured_kl"], dtype=np.float64), np.array(d["proxy"], dtype=np.float64),
                   np.array(d["nbytes"], dtype=np.int64), np.array(d["kept"], dtype=np.int64), dict(d.get("info", {})))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "SensitivityTable":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelpressError(f"{path}: not a sensitivity table ({type(e).__name__}: {e})") from None


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rho: Pearson correlation of the average ranks (ties share their mean rank)."""
    from scipy.stats import rankdata

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size < 2:
        return None
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / den) if den > 0 else None


def target_layers(lm: LoadedModel, targets: Iterable[str] = ("re:.*",),
                  ignore: Iterable[str] = ("lm_head",)) -> list[str]:
    """Names of the selected float linears inside the decoder blocks, in model order."""
    prefix = blocks_path(lm.module, lm.spec) if lm.spec else None
    if prefix is None:
        raise ModelpressError("sensitivity analysis needs a known architecture (decoder blocks)")
    picked = select(named_linears(lm.module), list(targets), list(ignore), lambda n: role_of(n, lm.module, lm.spec))
    names = [n for n, m in picked if n.startswith(prefix + ".") and isinstance(getattr(m, "weight", None), nn.Parameter)]
    if not names:
        raise ModelpressError(f"targets {list(targets)} minus ignore {list(ignore)} leave no float linear in the blocks")
    return names


@torch.no_grad()
def measure_sensitivity(lm: LoadedModel, ids: torch.Tensor, choices: list[Choice], *,
                        stats_ids: torch.Tensor | None = None, targets: Iterable[str] = ("re:.*",),
                        ignore: Iterable[str] = ("lm_head",),
                        iterate: Callable[[list, str], Iterable] | None = None) -> SensitivityTable:
    """Measure every (targeted layer, choice) by the KL on ``ids`` (n_samples, seq_len), each layer
    compressed with the Hessian of ``stats_ids`` (default ``ids``); see the module docstring."""
    if not choices:
        raise ModelpressError("sensitivity analysis needs at least one choice")
    t0, c0 = time.perf_counter(), time.process_time()
    names = target_layers(lm, targets, ignore)
    prefix = blocks_path(lm.module, lm.spec)
    blocks = get_blocks(lm.module, lm.spec)
    stats = capture_first_block_inputs(lm, ids if stats_ids is None else stats_ids)
    tail = _Tail(lm, blocks, capture_first_block_inputs(lm, ids), stats)
    L, K = len(names), len(choices)
    out = {k: np.zeros((L, K), dtype=np.float64 if k in ("measured", "proxy") else np.int64)
           for k in ("measured", "proxy", "nbytes", "kept")}
    numel = np.zeros(L, dtype=np.int64)
    row = {n: i for i, n in enumerate(names)}
    for i in (iterate or (lambda x, _d: x))(list(range(len(blocks))), "sensitivity"):
        mine = [n for n in names if n.startswith(f"{prefix}.{i}.")]
        hessians = tail.hessians(i, {n: lm.module.get_submodule(n) for n in mine})
        for n in mine:
            module = lm.module.get_submodule(n)
            W = layer_weight(n, module)  # (out, in)
            numel[row[n]] = W.numel()
            outs = []
            for k, c in enumerate(choices):
                p = c.perturb(W, hessians[n])
                E = W - p.W  # (out, in)
                out["proxy"][row[n], k] = float(((E @ hessians[n]) * E).sum())
                out["nbytes"][row[n], k], out["kept"][row[n], k] = p.nbytes, p.kept
                with _weight(module, p.W):
                    outs.append(tail.block_output(i))
            out["measured"][row[n], :] = tail.kl_after(i, torch.cat(outs, 0), K)
        stats.propagate(blocks[i])  # the Hessian stream moves on through the float block
    info = {"tokens": int(ids.numel()), "samples": int(ids.shape[0]), "seq_len": int(ids.shape[1]),
            "hessian_tokens": int((ids if stats_ids is None else stats_ids).numel()),
            "metric": "KL(float || layer compressed) of next-token distributions, nats/token",
            "proxy": "tr((W - W') H (W - W')^T), H = 2/n X^T X on the float inputs",
            "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}
    return SensitivityTable(names, list(choices), numel, out["measured"], out["proxy"], out["nbytes"], out["kept"], info)


class _Tail:
    """The float stream's cached block inputs, and running the rest of the model from a block;
    ``stats`` the stream (BlockInputs at the current block) the Hessians are taken from."""

    def __init__(self, lm: LoadedModel, blocks: list[nn.Module], inputs: Any, stats: Any) -> None:
        self.blocks, self.kwargs, self.stats = blocks, inputs.kwargs, stats
        self.norm = next((m for p in lm.spec.final_norm if (m := get_submodule(lm.module, p)) is not None), None)
        self.head = lm.module.get_output_embeddings() if hasattr(lm.module, "get_output_embeddings") else None
        if self.head is None:
            raise ModelpressError(f"{type(lm.module).__name__} has no output embeddings: KL needs a language model head")
        self.inputs = [inputs.hidden.clone()]  # per block i: its float input (n, seq, hidden)
        for blk in blocks:
            self.inputs.append(self._run(blk, self.inputs[-1]))
        self.ref = self._logprobs(self.inputs[-1])  # (n, seq, vocab)

    def _run(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        y = block(x, **self.kwargs)
        return y[0] if isinstance(y, tuple) else y

    def _logprobs(self, h: torch.Tensor) -> torch.Tensor:
        h = self.norm(h) if self.norm is not None else h
        return torch.log_softmax(self.head(h).float(), dim=-1)

    def hessians(self, i: int, mods: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
        """``2/n X^T X`` of each layer's input on the Hessian stream's float inputs of block ``i``."""
        accs = {n: HessianAccumulator(layer_weight(n, m).shape[1]) for n, m in mods.items()}
        with capture_inputs(mods, lambda n, x: accs[n].update(x.float())):
            self.stats.run(self.blocks[i])
        return {n: a.H for n, a in accs.items()}

    def block_output(self, i: int) -> torch.Tensor:
        return self._run(self.blocks[i], self.inputs[i])

    def kl_after(self, i: int, h: torch.Tensor, k: int) -> np.ndarray:
        """Mean KL per token of each of the ``k`` stacked streams ``h`` (k*n, seq, hidden) after block ``i``."""
        for blk in self.blocks[i + 1:]:
            h = self._run(blk, h)
        n = self.ref.shape[0]
        kl = []
        for j in range(k):  # one head at a time: (n, seq, vocab) log-probs are the big tensor here
            lq = self._logprobs(h[j * n:(j + 1) * n])
            kl.append(float((self.ref.exp() * (self.ref - lq)).sum(-1).mean()))
        return np.array(kl)


class _weight:
    """Context: the layer computes with ``W`` (out, in) instead of its own weight, restored after."""

    def __init__(self, module: nn.Module, W: torch.Tensor) -> None:
        self.module, self.W = module, W

    def __enter__(self) -> None:
        self.orig = self.module.weight.data
        W = self.W.T if is_conv1d(self.module) else self.W
        self.module.weight.data = W.to(self.orig.dtype).contiguous()

    def __exit__(self, *exc: Any) -> None:
        self.module.weight.data = self.orig
