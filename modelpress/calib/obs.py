"""OBS helpers shared by the Hessian-based one-shot methods (GPTQ, SparseGPT).

Both spread a column's error over the columns not yet processed with rows of one upper Cholesky
factor of ``(H + damp I)^-1``; computing it once here keeps the memory-lean, in-place LAPACK
route and the dampening policy identical for quantisation and pruning.
"""
from __future__ import annotations

import torch

from ..core.errors import ModelpressError
from ..core.threads import blas_threads
from ..quant.formats.base import Params, WeightFormat

#: How many times the dampening is raised tenfold before giving up on a non-PD Hessian.
MAX_DAMP_RETRIES = 4


def inverse_cholesky_(Hw: torch.Tensor, percdamp: float, warnings: list[str],
                      who: str = "gptq") -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + damp I)^-1``; dampening grows tenfold while H is not PD.

    ``Hw`` is a private copy of H that becomes the result: the factorisation, the inverse and
    the second factorisation run in that one buffer (LAPACK in place on CPU: no second n x n
    matrix, 127 MB each for a 5632-wide down_proj). A failed try restores it from the triangle
    LAPACK leaves untouched and retries with more dampening.
    """
    base = Hw.diagonal().clone()
    mean_diag = base.mean()
    backup = None if Hw.device.type == "cpu" else Hw.clone()  # torch's out= kernels overwrite both triangles
    tried = []
    for _ in range(MAX_DAMP_RETRIES + 1):
        Hw.diagonal().copy_(base + percdamp * mean_diag)
        if upper_chol_of_inverse_(Hw):
            if tried:
                warnings.append(f"Hessian not positive definite with percdamp={tried[0]:g}; "
                                f"used percdamp={percdamp:g}")
            return Hw, percdamp
        if backup is not None:
            Hw.copy_(backup)
        tried.append(percdamp)
        percdamp = 10 * percdamp if percdamp > 0 else 0.01
    raise ModelpressError(f"{who}: Hessian not positive definite even with percdamp={tried[-1]:g}")


def upper_chol_of_inverse_(A: torch.Tensor) -> bool:
    """Overwrite the symmetric PD ``A`` with the upper ``U`` of ``A^-1 = U^T U``; False if not PD.

    On CPU this calls LAPACK's potrf / potri / potrf on the same memory (a C-contiguous
    symmetric matrix is its own Fortran-order transpose, so the "lower" routines work in the C
    upper triangle; torch's out= variants copy to column-major buffers first). They never touch
    the C lower triangle, so on failure ``A`` is restored from it (all but the diagonal).
    """
    if A.device.type != "cpu" or not A.is_contiguous():
        return torch_upper_chol_of_inverse_(A)
    from scipy.linalg import lapack

    F = A.numpy().T  # Fortran view of the same memory
    potrf, potri = lapack.get_lapack_funcs(("potrf", "potri"), (F,))
    ok = True
    with blas_threads(torch.get_num_threads()):
        for step in (lambda a: potrf(a, lower=1, clean=0, overwrite_a=1), lambda a: potri(a, lower=1, overwrite_c=1),
                     lambda a: potrf(a, lower=1, clean=0, overwrite_a=1)):
            out, info = step(F)
            if out.ctypes.data != F.ctypes.data:  # the wrapper copied after all: keep working in A
                F[...] = out
            if info != 0:
                ok = False
                break
    if ok and bool(torch.isfinite(A).all()):
        A.triu_()
        return True
    low = A.tril(-1)  # the untouched original below the diagonal
    A.triu_(0).tril_(0).add_(low).add_(low.T)  # diagonal kept; the caller resets it
    return False


def torch_upper_chol_of_inverse_(A: torch.Tensor) -> bool:
    """:func:`upper_chol_of_inverse_` through torch's kernels (any device; they write both triangles,
    so on failure ``A`` is not restored: the caller keeps a copy)."""
    info = torch.empty((), dtype=torch.int32, device=A.device)
    torch.linalg.cholesky_ex(A, out=(A, info))
    if info != 0:
        return False
    torch.cholesky_inverse(A, out=A)
    torch.linalg.cholesky_ex(A, upper=True, out=(A, info))
    return bool(info == 0) and bool(torch.isfinite(A).all())


def quantize_column(fmt: WeightFormat, w: torch.Tensor, p: Params) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (rows,) uint8 and dequantised values (rows,) float32 of one column."""
    c = fmt.encode(w.view(-1, 1, 1), p)  # (rows, 1, 1)
    return c.view(-1), fmt.decode(c, p).view(-1).to(torch.float32)


def output_rel_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """Relative output error on the calibration inputs: sqrt(tr(E H E^T) / tr(W H W^T))."""
    E = W - Q
    num = torch.einsum("oi,ij,oj->", E, H, E)
    den = torch.einsum("oi,ij,oj->", W, H, W).clamp_min(1e-20)
    return float((num / den).clamp_min(0).sqrt())
