"""Thread-count control for torch ops."""
from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Temporarily run torch ops on ``n`` threads.

    Loops of tiny ops (GPTQ's per-column updates) are slower with several OpenMP threads than with
    one: the threads spin-wait on every op, worst on a busy shared machine.
    """
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
