"""Bad input to distillation is refused with one line naming the problem, before any training work
(the teacher never runs); a checkpoint of another recipe or other data is redone, not spliced."""
from __future__ import annotations

import pytest

from modelpress import api
from modelpress.cli.main import main
from modelpress.core.errors import ModelpressError
from modelpress.distill import method
from modelpress.distill.trainer import Trainer
from modelpress.models.loading import load_model
from modelpress.pipeline.recipe import parse_recipe
from tests.conftest import make_tiny_llama, make_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def _lm(tok, layers=2):
    return load_model(make_tiny_llama(seed=0, layers=layers), tokenizer=tok)


def _stage(**kw):
    return {"method": "distill", "train": {"steps": 4, "batch_size": 2, "checkpoint_every": 2}} | kw


@pytest.fixture
def no_training(monkeypatch):
    """Every way training work could start fails the test: a refusal must come first."""

    def started(*a, **k):
        raise AssertionError("training work started before the refusal")

    for name in ("Trainer", "generate_dataset"):
        monkeypatch.setattr(method, name, started)
    monkeypatch.setattr(method.TopKCache, "build", started)


@pytest.mark.parametrize("stage, needle", [
    (_stage(student={"kind": "config", "config": {"vocab_size": 512, "num_hidden_layers": 1}}),
     "student's vocabulary has 512 tokens, the teacher's 300"),
    (_stage(losses=[{"type": "hidden", "layer_map": {0: 0, 1: 5}}]),
     "layer map 1->5 names a layer that does not exist"),
    (_stage(losses=[{"type": "attention", "layer_map": {3: 1}}]), "layer map 3->1 names a layer that does not exist"),
    (_stage(student={"kind": "layers", "keep": [0, 7]}), r"student keep \[7\]: the teacher has blocks 0..1"),
    (_stage(train={"steps": 4, "batch_size": 8}, teacher_top_k=4),
     "training text gives 4 sequences, fewer than one batch of 8"),
])
def test_refused_before_any_training(stage, needle, tok, tiny_text_file, no_training):
    lm = _lm(tok)
    train = api.training_for(lm, tiny_text_file, 4, 16)
    with pytest.raises(ModelpressError, match=needle):
        api.apply(lm, {"stages": [stage]}, train=train, progress=False)


@pytest.mark.parametrize("stage, path", [
    (_stage(losses=[{"type": "kd", "temperature": 0}]), r"stages\[0\]\.losses\[0\]\.temperature: .*greater than 0"),
    (_stage(losses=[{"type": "kd", "temperature": -1.5}]), r"stages\[0\]\.losses\[0\]\.temperature"),
    (_stage(losses=[{"type": "ce"}, {"type": "kd", "alpha": 1.5}]),
     r"stages\[0\]\.losses\[1\]\.alpha: .*less than or equal to 1"),
    (_stage(losses=[{"type": "kd", "alpha": -0.1}]), r"stages\[0\]\.losses\[0\]\.alpha: .*greater than or equal to 0"),
    (_stage(train={"steps": 0}), r"stages\[0\]\.train\.steps: .*greater than or equal to 1"),
    (_stage(train={"tokens": 0}), r"stages\[0\]\.train\.tokens: .*greater than or equal to 1"),
    (_stage(train={"minutes": 0, "schedule": "constant"}), r"stages\[0\]\.train\.minutes: .*greater than 0"),
    (_stage(generate={"temperature": 0}), r"stages\[0\]\.generate\.temperature"),
    (_stage(generate={"prompts": "p.txt", "from_docs": "bundled:c4"}), "not both"),
])
def test_bad_numbers_are_refused_when_the_recipe_is_read(stage, path):
    with pytest.raises(ModelpressError, match=path) as err:
        parse_recipe({"stages": [stage]})
    assert "\n" not in str(err.value) and "function-before" not in str(err.value)


def test_cli_bad_input_is_one_line_exit_2(tiny_llama_dir, tiny_text_file, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - method: distill\n    train: {steps: 0}\n")
    out = str(tmp_path / "out")
    assert main(["--quiet", "compress", "--model", str(tiny_llama_dir), "--recipe", str(recipe), "--output", out]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "train.steps" in err
    short = tmp_path / "short.txt"
    short.write_text("far too short a text to train on")
    assert main(["--quiet", "compress", "--model", str(tiny_llama_dir), "--recipe", "distill-half-depth", "--train",
                 str(short), "--train-samples", "8", "--train-seq-len", "16", "--output", out]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "training text" in err and "8 x 16 = 128 asked" in err and "--train-samples" in err


class Boom(Exception):
    pass


def test_checkpoint_of_another_recipe_or_other_data_is_redone(tok, tiny_text_file, tmp_path, monkeypatch):
    other_text = tmp_path / "other.txt"
    other_text.write_text(tiny_text_file.read_text().replace("robot", "rabbit"))
    distill = _stage()
    pruned_first = [{"method": "magnitude", "pattern": "unstructured", "sparsity": 0.5}, distill]
    save = Trainer._checkpoint

    def run(stages, text=tiny_text_file, die=False):
        monkeypatch.setattr(Trainer, "_checkpoint", _dying(save) if die else save)
        lm = _lm(tok)
        train = api.training_for(lm, text, 4, 16)
        return api.apply(lm, {"stages": stages}, train=train, workdir=tmp_path / "work", progress=False)

    def killed_then(stages, text=tiny_text_file) -> int:
        with pytest.raises(Boom):
            run([distill], die=True)  # leaves a checkpoint at step 2
        return run(stages, text).metrics[-1]["resumed_from"]

    assert killed_then([distill]) == 2  # the same job resumes
    assert killed_then(pruned_first) == 0  # another recipe: an earlier stage changed the teacher
    assert killed_then([_stage(train={"steps": 4, "batch_size": 2, "checkpoint_every": 2, "lr": 1e-3})]) == 0
    assert killed_then([distill], other_text) == 0  # other data


def _dying(save):
    def dying(self, step, *a):
        save(self, step, *a)
        raise Boom

    return dying
