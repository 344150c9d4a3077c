"""The set-up the one-model compression benches share: the float model, its evaluation ids, the
calibration sample, a perplexity function and fresh copies of the float model for each row."""
from __future__ import annotations

import argparse
import copy
from typing import Any, Callable

import torch


def float_model_and_eval(args: argparse.Namespace) -> tuple[Any, Any, Callable[[torch.nn.Module], float],
                                                           Callable[[], Any]]:
    """(float model, calibration, ppl(module), fresh()) from ``args.model``, ``args.eval_data``,
    ``args.eval_tokens``, ``args.eval_seq_len``, ``args.calib``, ``args.calib_samples``, ``args.calib_seq_len``.
    ``fresh()`` is a new float copy sharing the tokenizer, so every row starts from the same weights."""
    import modelpress as mp
    from modelpress.data.sources import read_text
    from modelpress.eval.perplexity import perplexity
    from modelpress.quant.qlinear import cached_dequant

    base_lm = mp.load(args.model)
    ids = base_lm.tokenizer.encode(read_text(args.eval_data, True))[: args.eval_tokens]
    bos = base_lm.tokenizer.bos_token_id if base_lm.add_bos else None
    calib = mp.calibration_for(base_lm, args.calib, args.calib_samples, args.calib_seq_len)

    def ppl(module: torch.nn.Module) -> float:
        with cached_dequant():
            return perplexity(module, ids, args.eval_seq_len, bos_token_id=bos).perplexity

    def fresh() -> Any:
        lm = mp.load(copy.deepcopy(base_lm.module))
        lm.tokenizer, lm.add_bos, lm.source = base_lm.tokenizer, base_lm.add_bos, base_lm.source
        return lm

    return base_lm, calib, ppl, fresh
