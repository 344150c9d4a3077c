"""Finding extensions: the built-in ones by their family's package, third-party ones by entry point.

Each registry knows the packages of its family (methods: ``modelpress.quant.algos``,
``modelpress.sparsity`` ...). The first time a registry is asked for a name it does not hold, or
for the list of its names, it imports every module of those packages once, and every
``modelpress.plugins`` entry point of the installed distributions. A module registers what it
defines with one decorator; there is no second list to keep in step. Import errors are not
swallowed: a broken extension fails loudly, naming itself.

A third-party package declares, in its ``pyproject.toml``::

    [project.entry-points."modelpress.plugins"]
    mymethod = "my_package.my_method"      # a module whose decorators register its extensions
"""
from __future__ import annotations

import functools
import importlib
import pkgutil
from importlib import metadata

from .errors import ModelpressError

GROUP = "modelpress.plugins"
_IMPORTED: set[str] = set()


def import_package(name: str) -> None:
    """Import package ``name`` and every module below it (once; sorted, so the order is stable)."""
    if name in _IMPORTED:
        return
    _IMPORTED.add(name)
    pkg = importlib.import_module(name)
    for info in sorted(pkgutil.walk_packages(getattr(pkg, "__path__", []), name + "."), key=lambda i: i.name):
        importlib.import_module(info.name)


@functools.lru_cache(maxsize=1)
def _entry_points() -> tuple[metadata.EntryPoint, ...]:
    return tuple(metadata.entry_points(group=GROUP))


def plugin_modules() -> set[str]:
    """Modules that installed plugins name (the only foreign modules a saved folder may ask for)."""
    return {ep.module for ep in _entry_points()}


def load_plugins() -> None:
    """Import every installed ``modelpress.plugins`` entry point (once)."""
    for ep in _entry_points():
        key = f"entry-point:{ep.value}"
        if key in _IMPORTED:
            continue
        _IMPORTED.add(key)
        try:
            ep.load()
        except Exception as e:  # noqa: BLE001  -- name the broken plugin instead of a bare traceback
            raise ModelpressError(f"modelpress plugin {ep.name!r} ({ep.value}, from "
                                  f"{getattr(ep.dist, 'name', '?')}) failed to load: {type(e).__name__}: {e}") from e


def discover(packages: tuple[str, ...]) -> None:
    """Import the built-in extension packages of one family, then the installed plugins."""
    for p in packages:
        import_package(p)
    load_plugins()
