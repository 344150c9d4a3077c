"""Choosing a stage's layers and reading their weights, checked (shared by every method)."""
from __future__ import annotations

import torch

from ..core.errors import ModelpressError
from ..core.method import MethodConfig
from ..core.selectors import select
from .archspec import role_of
from .layers import linear_weight, named_linears
from .loading import LoadedModel
from .mapped import checked_at_load


def select_layers(lm: LoadedModel, cfg: MethodConfig) -> list[tuple[str, torch.nn.Module]]:
    """The linear-like layers of ``lm`` chosen by ``cfg.targets`` minus ``cfg.ignore``.

    A stage that needs float weights refuses layers whose weight is already packed codes: the
    float weight is gone, and re-quantising codes compounds their rounding.
    """
    role_fn = lambda n: role_of(n, lm.module, lm.spec)  # noqa: E731
    layers = select(named_linears(lm.module), cfg.targets, cfg.ignore, role_fn)
    if not layers:
        raise ModelpressError(f"stage {cfg.method!r}: targets {cfg.targets} minus ignore {cfg.ignore} leave no layer")
    done = [n for n, m in layers if cfg.needs_float_weights and not isinstance(getattr(m, "weight", None), torch.Tensor)]
    if done:
        kind = type(dict(layers)[done[0]]).__name__
        raise ModelpressError(f"stage {cfg.method!r}: {len(done)} selected layer(s) are already compressed ({done[0]}: "
                              f"{kind}); compress the original model instead, or add them to the stage's ignore list")
    return layers


def check_finite(name: str, w: torch.Tensor) -> None:
    """A NaN/Inf weight would poison every scale: refuse it and name the tensor."""
    if not torch.isfinite(w).all():
        bad = int((~torch.isfinite(w)).sum())
        raise ModelpressError(f"weight {name}.weight has {bad} NaN/Inf values; refusing to compress it")


def layer_weight(name: str, module: torch.nn.Module) -> torch.Tensor:
    """(out, in) float32 copy of a layer's weight, checked finite (a copy: callers may write to the layer)."""
    w = linear_weight(module).detach().to(torch.float32, copy=True)
    check_finite(name, w)
    return w


def check_model_finite(lm: LoadedModel) -> None:
    """Refuse a model holding NaN/Inf anywhere (weights, norms, embeddings, scales), naming the tensor.

    One such value poisons every scale computed from it and every activation after it; the result
    would be reported as ``nan -> nan`` instead of failing.
    """
    seen: set[tuple[int, int]] = set()
    for name, t in lm.module.state_dict().items():
        if t.is_meta or not t.is_floating_point() or t.numel() == 0:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        if checked_at_load(t):  # mapped from its file and checked then: reading it again pages it all in
            continue
        if not torch.isfinite(t).all():
            n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            raise ModelpressError(f"{lm.source}: tensor {name} holds {n_nan} NaN and {n_inf} Inf value(s); "
                                  "refusing to use a model with non-finite weights")
