"""Forward hooks that feed layer inputs to statistics accumulators."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn as nn


@contextmanager
def capture_inputs(modules: dict[str, nn.Module], sink: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """While active, every forward of ``modules[name]`` calls ``sink(name, input)``."""
    handles = []
    for name, m in modules.items():
        handles.append(m.register_forward_pre_hook(lambda _m, args, _n=name: sink(_n, args[0])))
    try:
        yield
    finally:
        for h in handles:
            h.remove()

