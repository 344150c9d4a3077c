"""modelpress: make trained models smaller and faster, and prove what quality they kept.

The public API is imported lazily so ``import modelpress`` stays cheap.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
_API = ("load", "apply", "compress", "evaluate", "save", "as_recipe", "calibration_for")


def __getattr__(name: str) -> Any:
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'modelpress' has no attribute {name!r}")
