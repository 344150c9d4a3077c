"""Run a registration as soon as an optional library is imported, in whichever order the two come.

``import modelpress`` must stay cheap, so it cannot import PEFT to teach it our layers; and a user
may import PEFT before or after modelpress. :func:`after_import` runs ``module.function()`` now if
the library is already imported, else right after the library's own module has executed, through
a finder at the front of ``sys.meta_path`` that wraps the library's loader (stdlib only, no
import of the library until the user imports it). Errors in the registration are not swallowed.

Example:
    >>> after_import("peft", "modelpress.lowrank.adapters.dispatch", "register_with_peft")  # doctest: +SKIP
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Any

_PENDING: dict[str, list[tuple[str, str]]] = {}  # library -> [(module, function)] still to run


def _run(calls: list[tuple[str, str]]) -> None:
    for module, function in calls:
        getattr(importlib.import_module(module), function)()


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for a pending library it asks the other finders and wraps the loader."""

    def find_spec(self, name: str, path: Any, target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if name not in _PENDING:
            return None
        spec = next((s for f in sys.meta_path if f is not self and hasattr(f, "find_spec")
                     for s in [f.find_spec(name, path, target)] if s is not None), None)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: ModuleType) -> None:
            exec_module(module)
            _run(_PENDING.pop(name, []))

        spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


_FINDER = _AfterImport()


def after_import(library: str, module: str, function: str) -> None:
    """Call ``module.function()`` once ``library`` is imported (at once if it already is)."""
    if library in sys.modules:
        _run([(module, function)])
        return
    _PENDING.setdefault(library, []).append((module, function))
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
