"""Trains a tiny model for 12 steps (global batch 8) and writes the loss curve: run alone, or under
``torch.distributed.run`` with several processes (the same code: accelerate picks gloo on CPU)."""
from __future__ import annotations

import json
import sys

import torch

torch.set_num_threads(1)

from modelpress.distill.losses import hard_ce  # noqa: E402
from modelpress.distill.trainer import TrainConfig, TrainData, Trainer  # noqa: E402
from tests.conftest import make_tiny_llama  # noqa: E402


def step(model, batch):
    return hard_ce(model(input_ids=batch.input_ids).logits, batch), int(batch.input_ids.numel())


def main(out: str) -> None:
    model = make_tiny_llama(seed=4, layers=2)
    ids = torch.randint(3, 40, (32, 16), generator=torch.Generator().manual_seed(0))
    tr = Trainer(model, step, TrainData(ids), TrainConfig(steps=12, batch_size=8, lr=2e-3, log_every=1), progress=False)
    res = tr.train()
    if tr.accelerator.is_main_process:
        w = tr.unwrapped().model.layers[0].mlp.down_proj.weight.detach().flatten()[:64].tolist()
        json.dump(res.to_dict() | {"final_weights": w}, open(out, "w"))


if __name__ == "__main__":
    main(sys.argv[1])
