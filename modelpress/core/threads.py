"""Thread-count control for torch ops and for the BLAS that scipy calls."""
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


_BLAS_CONTROLLER = None


@contextlib.contextmanager
def blas_threads(n: int) -> Iterator[None]:
    """Run scipy's BLAS / LAPACK calls on ``n`` threads (torch's count, so ``--threads 1`` holds for
    them too); a no-op without ``threadpoolctl``."""
    global _BLAS_CONTROLLER
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - a dependency, but never required for correctness
        yield
        return
    if _BLAS_CONTROLLER is None:  # finding the loaded libraries costs milliseconds: once per process
        _BLAS_CONTROLLER = ThreadpoolController()
    with _BLAS_CONTROLLER.limit(limits=n, user_api="blas"):
        yield
