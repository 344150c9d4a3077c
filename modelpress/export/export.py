"""``export``: one verb from a loaded (or on-disk) model to a target format's files.

Example:
    >>> from modelpress.export.export import export
    >>> export("out/smol-gptq-w4-g64", "gguf", "out/smol.gguf", gguf_type="Q4_0")  # doctest: +SKIP
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.errors import ModelpressError
from ..models.loading import LoadedModel
from .plan import ExportReport, OnUnsupported
from .writers import WRITERS


def export(model: str | Path | LoadedModel, fmt: str, output: str | Path, *,
           on_unsupported: str | OnUnsupported = OnUnsupported.REFUSE, overwrite: bool = False,
           **options: Any) -> ExportReport:
    """Write ``model`` as ``fmt`` (a registered writer: ``hf``, ``compressed-tensors``, ``gguf`` ...)
    to ``output``.

    ``model``: a LoadedModel or anything :func:`modelpress.load` accepts (a modelpress output
    folder included). ``options`` go to the writer (its registered options, e.g. ``gguf_type``,
    ``float_type``, ``dtype``; ``kv_cache`` for compressed-tensors). Returns the per-tensor
    :class:`ExportReport` (also written beside the output).
    """
    from .. import api

    writer = WRITERS.get(str(fmt))
    policies = [p.value for p in OnUnsupported]
    if str(getattr(on_unsupported, "value", on_unsupported)) not in policies:
        raise ModelpressError(f"on_unsupported {on_unsupported!r}: choose one of {', '.join(policies)}")
    lm = api.load(model) if not isinstance(model, LoadedModel) else model
    return writer.write(lm, output, on_unsupported=OnUnsupported(on_unsupported), overwrite=overwrite, **options)
