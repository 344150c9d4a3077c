"""Teacher-generated data: seeded sampling is deterministic, exact and near duplicates go (checked
against brute force), the teacher's score drops what it finds unlikely and equals a hand
computation, and the CLI's JSONL trains a student as ``--train`` text and inside a distill stage."""
from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F

from modelpress import api
from modelpress.cli.main import main
from modelpress.core.errors import ModelpressError
from modelpress.data.sources import read_documents
from modelpress.distill.generate import (GenerateConfig, Sample, deduplicate, generate_dataset, jaccard, likely,
                                         load_prompts, normalized, sample, shingles, teacher_logprobs)
from modelpress.models.loading import load_model
from tests.conftest import make_tiny_llama, make_tokenizer, shared_file

PROMPTS = ["Once upon a time", "The robot", "One day the robot met a cat who could not count",
           "Every morning it counted the birds, the trees and the clouds."]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model(make_tiny_llama(seed=0), tokenizer=make_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    p.write_text("\n".join(PROMPTS) + "\n\n")
    return p


def _cfg(prompts_file, **kw):
    base = {"prompts": str(prompts_file), "samples": 8, "max_new_tokens": 12, "batch_size": 3, "seed": 0,
            "near_duplicate": 1.0}
    return GenerateConfig(**(base | kw))


def test_same_seed_same_samples(tiny, prompts_file, tmp_path):
    cfg = _cfg(prompts_file)
    prompts = load_prompts(tiny, cfg)
    assert [p for p, _ in prompts] == PROMPTS  # blank lines skipped
    a, b = sample(tiny, cfg, prompts), sample(tiny, cfg, prompts)
    assert [s.new_ids for s in a] == [s.new_ids for s in b] and len(a) == 8
    assert [s.prompt for s in a] == [PROMPTS[i % 4] for i in range(8)]  # prompts taken in turn
    other = sample(tiny, _cfg(prompts_file, seed=1), prompts)
    assert [s.new_ids for s in other] != [s.new_ids for s in a]
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    sample(tiny, cfg, prompts)
    assert torch.equal(torch.rand(1), before)  # the caller's random stream is left alone
    for name in ("x.jsonl", "y.jsonl"):
        generate_dataset(tiny, cfg, tmp_path / name)
    assert (tmp_path / "x.jsonl").read_bytes() == (tmp_path / "y.jsonl").read_bytes()


def _brute_force(texts, threshold, k):
    kept, exact, near = [], 0, 0
    for i, t in enumerate(texts):
        if any(normalized(t) == normalized(u) for u in texts[:i]):
            exact += 1
        elif any(jaccard(shingles(t, k), shingles(texts[j], k)) >= threshold for j in kept):
            near += 1
        else:
            kept.append(i)
    return kept, {"exact_duplicate": exact, "near_duplicate": near}


def test_exact_and_near_duplicates():
    words = [f"w{i}" for i in range(30)]
    base = " ".join(words)
    one_word = " ".join(words[:15] + ["changed"] + words[16:])  # 3 of 28 shingles differ: J = 25/31
    two_words = " ".join(words[:5] + ["a"] + words[6:24] + ["b"] + words[25:])  # J = 22/34
    texts = [base, "  " + base.upper() + "\n", one_word, two_words, "a short text", "A  short text"]
    assert jaccard(shingles(base, 3), shingles(one_word, 3)) == pytest.approx(25 / 31)
    keep, counts = deduplicate(texts, 0.8, 3)
    assert keep == [0, 3, 4] and counts == {"exact_duplicate": 2, "near_duplicate": 1}
    rng = random.Random(0)  # many texts mutated from a few: every decision agrees with brute force
    seeds = [[rng.choice("abcdefgh") for _ in range(rng.randint(2, 25))] for _ in range(6)]
    texts = []
    for _ in range(150):
        w = list(rng.choice(seeds))
        for _ in range(rng.randint(0, 3)):
            w[rng.randrange(len(w))] = rng.choice("abcdefghij")
        texts.append(" ".join(w))
    for threshold, k in ((0.8, 3), (0.5, 2), (1.0, 1)):
        assert deduplicate(texts, threshold, k) == _brute_force(texts, threshold, k)


def test_stored_logprob_equals_hand_computation(tiny, prompts_file, tmp_path):
    cfg = _cfg(prompts_file)
    rep = generate_dataset(tiny, cfg, tmp_path / "gen.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "gen.jsonl").read_text().splitlines()]
    samples = [s for s in sample(tiny, cfg, load_prompts(tiny, cfg)) if s.new_ids]
    assert rep.counts["kept"] == len(rows) == len(samples) >= 6
    for row, s in zip(rows, samples):
        ids = torch.tensor([s.prompt_ids + s.new_ids])  # one sequence alone: no padding at all
        with torch.no_grad():
            logp = F.log_softmax(tiny.module(input_ids=ids).logits[0].double(), dim=-1)  # (T, V)
        p = len(s.prompt_ids)
        hand = sum(float(logp[p - 1 + j, t]) for j, t in enumerate(s.new_ids)) / len(s.new_ids)
        assert row["teacher_logprob"] == pytest.approx(hand, abs=1e-4)
        assert row["prompt"] == s.prompt and row["text"] == s.text


def test_filter_drops_what_the_teacher_finds_unlikely(prompts_file, tmp_path):
    lm = load_model(shared_file("stories260k/stories260K.bin"))
    cfg = _cfg(prompts_file, samples=8, max_new_tokens=24, batch_size=4, near_duplicate=0.8)
    real = [s for s in sample(lm, cfg, load_prompts(lm, cfg)) if s.new_ids]
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(3, lm.module.config.vocab_size, (24,), generator=g).tolist()
    crafted = Sample("Once upon a time", real[0].prompt_ids, noise)
    scores = teacher_logprobs(lm.module, real + [crafted], batch_size=4)
    assert max(scores[:-1]) < 0 and scores[-1] < min(scores[:-1]) - 2  # random tokens: far less likely
    assert likely(scores, min_logprob=-4.0, drop_fraction=0.0) == [True] * len(real) + [False]
    assert likely(scores, min_logprob=None, drop_fraction=1 / len(scores)) == [True] * len(real) + [False]
    # the whole pipeline reports what its threshold dropped, and keeps only what passes it
    mid = sorted(scores[:-1])[len(real) // 2]
    rep = generate_dataset(lm, cfg.model_copy(update={"min_logprob": mid}), tmp_path / "gen.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "gen.jsonl").read_text().splitlines()]
    assert rep.counts["unlikely"] >= 1 and rep.counts["kept"] == len(rows) >= 1
    assert all(r["teacher_logprob"] >= mid for r in rows)
    assert sum(rep.counts[k] for k in ("empty", "exact_duplicate", "near_duplicate", "unlikely", "kept")) == 8
    with pytest.raises(ModelpressError, match="every sample was dropped"):
        generate_dataset(lm, cfg.model_copy(update={"min_logprob": -1e-6}), tmp_path / "none.jsonl")


def test_cli_writes_a_dataset_that_trains_as_train_text(tiny_llama_dir, prompts_file, tmp_path, capsys):
    out = tmp_path / "gen.jsonl"
    argv = ["--quiet", "generate", "--model", str(tiny_llama_dir), "--prompts", str(prompts_file), "--samples", "12",
            "--max-new-tokens", "16", "--seed", "3", "--output", str(out)]
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    meta = json.loads(out.with_suffix(".export.json").read_text())
    assert meta["format"] == "generated-text" and meta["seed"] == 3 and meta["rows"] == len(rows)
    assert meta["counts"]["generated"] == 12 and meta["teacher"]["source"] == str(tiny_llama_dir)
    assert set(rows[0]) == {"text", "prompt", "teacher_logprob"}
    assert read_documents(out) == [r["text"] for r in rows]  # what --train reads
    assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0  # our own file (its sidecar says so) may be replaced
    foreign = tmp_path / "mine.jsonl"
    foreign.write_text('{"text": "a"}\n')
    assert main(argv[:-1] + [str(foreign), "--overwrite"]) == 2 and foreign.read_text() == '{"text": "a"}\n'
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - method: distill\n    train: {steps: 2, batch_size: 2, checkpoint_every: 1}\n")
    student = tmp_path / "student"
    assert main(["--quiet", "compress", "--model", str(tiny_llama_dir), "--recipe", str(recipe), "--train", str(out),
                 "--train-samples", "4", "--train-seq-len", "16", "--output", str(student)]) == 0
    report = json.loads((student / "report.json").read_text())
    assert report["stages"][0]["metrics"][0]["steps"] == 2


class Boom(Exception):
    pass


def test_distill_stage_generates_once_and_a_resumed_run_reuses_it(tiny_text_file, tmp_path, monkeypatch):
    from modelpress.distill import method
    from modelpress.distill.trainer import Trainer

    recipe = {"stages": [{"method": "distill", "train": {"steps": 4, "batch_size": 2, "checkpoint_every": 2},
                          "generate": {"samples": 6, "max_new_tokens": 12, "prompt_tokens": 6, "batch_size": 3}}]}
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()

    def run():
        lm = load_model(make_tiny_llama(seed=0), tokenizer=make_tokenizer(tok_dir))
        train = api.training_for(lm, tiny_text_file, 4, 32)
        return api.apply(lm, recipe, train=train, workdir=tmp_path / "work", progress=False)

    save = Trainer._checkpoint

    def dying(self, step, *a):
        save(self, step, *a)
        raise Boom

    monkeypatch.setattr(Trainer, "_checkpoint", dying)
    with pytest.raises(Boom):
        run()
    assert len(list((tmp_path / "work" / "modelpress-run").glob("generated-*.jsonl"))) == 1
    monkeypatch.setattr(Trainer, "_checkpoint", save)

    def no_second_time(*a, **k):
        raise AssertionError("generated again")

    monkeypatch.setattr(method, "generate_dataset", no_second_time)
    ctx = run()
    m = ctx.metrics[-1]
    assert m["resumed_from"] == 2 and m["steps"] == 4  # the same generated data: the checkpoint fits
    assert m["generated"]["generated"] == 6 and m["generated"]["kept"] >= 2
    assert not (tmp_path / "work" / "modelpress-run").exists()  # the run folder (cached text too) goes on success


def test_on_policy_the_student_generates_and_the_teacher_scores(tiny_text_file, tmp_path, monkeypatch):
    from modelpress.distill import method
    from modelpress.pipeline.recipe import parse_recipe

    seen = []
    real = method.model_outputs

    def spy(model, batch, want):
        seen.append((batch.input_ids.clone(), batch.labels))
        return real(model, batch, want)

    monkeypatch.setattr(method, "model_outputs", spy)
    stage = {"method": "distill", "losses": [{"type": "kd", "alpha": 1.0, "divergence": "jsd"}],
             "train": {"steps": 3, "batch_size": 2},
             "on_policy": {"fraction": 1.0, "prompt_tokens": 4, "max_new_tokens": 8}}
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()

    def run(fraction):
        lm = load_model(make_tiny_llama(seed=0), tokenizer=make_tokenizer(tok_dir))
        train = api.training_for(lm, tiny_text_file, 4, 16)
        st = stage | {"on_policy": stage["on_policy"] | {"fraction": fraction}}
        api.apply(lm, {"stages": [st]}, train=train, progress=False)
        return [p.detach().clone() for p in lm.module.parameters()], train

    weights, train = run(1.0)
    assert len(seen) == 6  # 3 steps, teacher and student each on the same sequences
    starts = {tuple(r[:4].tolist()) for r in train.input_ids}
    for ids, labels in seen:
        assert ids.shape[1] <= 4 + 8 and all(tuple(r[:4].tolist()) in starts for r in ids)  # the student continued them
        assert (labels[:, :3] == -100).all() and (labels[:, 3] != -100).all()  # scored: the generated tokens only
    again, _ = run(1.0)
    assert all(torch.equal(a, b) for a, b in zip(weights, again))  # seeded: the same samples, the same student
    seen.clear()
    run(0.0)
    assert all(labels is None and ids.shape[1] == 16 for ids, labels in seen)  # off-policy: the training text
    with pytest.raises(ModelpressError, match="drop teacher_top_k"):
        parse_recipe({"stages": [stage | {"teacher_top_k": 4}]})
