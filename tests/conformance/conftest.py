"""Fixtures of the conformance matrix: one BLAS thread while it runs (see ``_one_blas_thread``)."""
from __future__ import annotations

import ctypes
from collections.abc import Iterator
from pathlib import Path

import pytest


def _openblas_libs() -> list[ctypes.CDLL]:
    """The OpenBLAS libraries loaded in this process (numpy's and scipy's bundled copies)."""
    import numpy  # noqa: F401  -- load them first
    import scipy.linalg  # noqa: F401

    paths = sorted({line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
                    if "openblas" in line.rsplit("/", 1)[-1]})
    return [ctypes.CDLL(p) for p in paths]


def _set_threads(lib: ctypes.CDLL, n: int | None) -> int | None:
    """Set ``lib``'s thread count (when ``n``), returning the previous one, or None when unknown."""
    for prefix in ("scipy_openblas", "openblas"):
        get, put = getattr(lib, f"{prefix}_get_num_threads", None), getattr(lib, f"{prefix}_set_num_threads", None)
        if get is None:
            get = getattr(lib, f"{prefix}_get_num_threads64_", None)
            put = getattr(lib, f"{prefix}_set_num_threads64_", None)
        if get is not None and put is not None:
            old = int(get())
            if n is not None:
                put(n)
            return old
    return None


@pytest.fixture(scope="module", autouse=True)
def _one_blas_thread() -> Iterator[None]:
    """Tiny GPTQ/SparseGPT Hessians go through scipy's LAPACK, whose OpenBLAS threads spin-wait on a busy
    2-core machine: one ``potri`` of a 64 x 64 matrix took 0.16 s with the default threads and
    0.1 ms with one. The matrix runs hundreds of them, so it pins OpenBLAS to one thread (as
    ``tests/conftest.py`` pins torch) and restores the previous count afterwards. Linux only; a
    no-op elsewhere."""
    try:
        libs = _openblas_libs()
    except (OSError, ImportError):
        libs = []
    old = [(lib, _set_threads(lib, 1)) for lib in libs]
    yield
    for lib, n in old:
        if n is not None:
            _set_threads(lib, n)


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the tests of one matrix cell together (they share its compression), in cell order.

    Only the matrix's own items move, within the positions they already hold.
    """
    slots = [i for i, it in enumerate(items) if it.nodeid.split("::")[0].endswith("conformance/test_matrix.py")
             and hasattr(it, "callspec") and "cell" in it.callspec.params]
    ordered = sorted((items[i] for i in slots), key=lambda it: it.callspec.params["cell"].order)
    for i, it in zip(slots, ordered):
        items[i] = it


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """With ``MODELPRESS_CONFORMANCE_LOG=FILE``, append one JSON line per failed / skipped test (its
    id and the first line of its message) so the failures can be grouped by cause."""
    import json
    import os

    path = os.environ.get("MODELPRESS_CONFORMANCE_LOG")
    if not path or "conformance" not in report.nodeid or not (report.failed or report.skipped):
        return
    if report.skipped and isinstance(report.longrepr, tuple):
        msg = str(report.longrepr[2])
    else:
        crash = getattr(report.longrepr, "reprcrash", None)
        msg = crash.message if crash is not None else str(report.longrepr)
    with open(path, "a") as f:
        f.write(json.dumps({"test": report.nodeid, "when": report.when, "outcome": report.outcome,
                            "message": msg.strip().splitlines()[0] if msg.strip() else "",
                            "duration": round(report.duration, 3)}) + "\n")
