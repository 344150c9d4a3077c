"""modelpress: make trained models smaller and faster, and prove what quality they kept.

The public API is imported lazily so ``import modelpress`` stays cheap.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
_API = ("load", "apply", "compress", "evaluate", "save", "as_recipe", "calibration_for")

# PEFT (optional) learns our quantised layers when it is imported: PeftModel.from_pretrained works
# on our models with no extra argument (modelpress/lowrank/adapters/dispatch.py says how).
from .core.import_hooks import after_import  # noqa: E402

after_import("peft", "modelpress.lowrank.adapters.dispatch", "register_with_peft")


def __getattr__(name: str) -> Any:
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'modelpress' has no attribute {name!r}")
