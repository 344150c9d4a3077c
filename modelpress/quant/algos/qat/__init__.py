"""Quantisation-aware training (EfficientQAT): block-wise reconstruction of weights and step sizes
(``block-ap``, a reconstruction stage) then end-to-end training of the step sizes alone (``e2e-qp``,
a training stage). The fake-quantised layers they train are in :mod:`modelpress.quant.fake` (weights)
and :mod:`modelpress.quant.fake_act` (activations, W8A8)."""
from .block_ap import BlockFit, reconstruct

__all__ = ["BlockFit", "reconstruct"]
