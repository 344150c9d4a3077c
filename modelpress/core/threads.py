"""How torch ops run: thread counts (torch's and the BLAS that scipy calls) and matmul precision."""
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


#: ``--matmul-precision`` choices -> torch's float32 matmul precision names.
MATMUL_PRECISIONS = {"fp32": "highest", "bf16": "medium"}


def torch_matmul_precision(name: str) -> str:
    """torch's name for ``name``; ValueError for a name that is not a ``--matmul-precision`` choice."""
    if name not in MATMUL_PRECISIONS:
        raise ValueError(f"unknown matmul precision {name!r}; choose from {', '.join(MATMUL_PRECISIONS)}")
    return MATMUL_PRECISIONS[name]


@contextlib.contextmanager
def matmul_precision(name: str) -> Iterator[None]:
    """Run float32 matmuls at ``name``: "fp32" (torch's "highest") or "bf16" (torch's "medium": the
    backend may use bfloat16 arithmetic; tensors stay float32 in and out).

    Why: the calibration forwards and Hessian products are most of a one-shot run's time, and on
    CPUs with AVX512-BF16 oneDNN runs them about twice as fast this way. Measured on this project's
    CPU: relative error 3.8e-7 against fp32's 2.5e-7 (oneDNN splits each float32 into bfloat16
    parts); a backend that rounds the inputs to bfloat16 once gives about 3e-3. Scoped, not global:
    solvers (GPTQ's column loop, Cholesky) keep full precision.
    """
    import torch

    new, old = torch_matmul_precision(name), torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(new)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)
