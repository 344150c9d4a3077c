"""Stateless state-dict codecs, one module per export target.

A codec turns one of our stored layers (a :class:`~modelpress.quant.formats.base.QTensor`) into
the tensors a target format stores for it, or says :class:`~modelpress.export.plan.Unrepresentable`.
Codecs know nothing about models, files or CLIs; writers in :mod:`modelpress.export.writers` do.

* :mod:`.compressed_tensors`: ``CT_CODECS`` keyed by our format tag (``int``, ``fp8``, ``nvfp4``, ``mxfp4``).
* :mod:`.gguf_blocks`: ``GGUF_CODECS`` keyed by GGML block type name (``Q4_0`` ... ``Q6_K``).
"""
