"""C. Broken input files for every file option: a one-line user / environment error, never a traceback.

For --model, --recipe, --calib, eval's --data and compress's --eval-data: missing, empty, truncated,
binary (with and without NUL bytes), latin-1 text, a folder where a file belongs (and a file where
--model's folder belongs), unreadable (``open`` raises PermissionError: tests run as root).
Then content errors: JSONL rows of the wrong type, bad selectors, empty recipes, pickled weights,
NaN / Inf weights, a mistyped relative model folder.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

from tests.conftest import TEXT

from .support import (LATIN1_TEXT, Result, assert_nothing_half_written, assert_user_error, build_model_dir, calib_args,
                      copy_model, driver_cmd, driver_env, gptq_recipe_name, line_number,
                      make_tiny_llama, make_tokenizer, make_unreadable, random_bytes, recipe_text_half,
                      utf8_cut_mid_char)

BINARY = random_bytes(3000, nul=False)
BINARY_NUL = random_bytes(3000, nul=True)


# -- how each input is passed ---------------------------------------------------------------------

def _argv(kind: str, path: Path, model_dir: Path, text_file: Path, out: Path) -> list:
    if kind == "model":
        return ["compress", "--model", path, "--recipe", "rtn-w8", "--output", out]
    if kind == "recipe":
        return ["compress", "--model", model_dir, "--recipe", path, "--output", out]
    if kind == "calib":
        return ["compress", "--model", model_dir, "--recipe", gptq_recipe_name(), "--calib", path,
                "--calib-samples", "4", "--calib-seq-len", "32", "--output", out]
    if kind == "eval-data":
        return ["compress", "--model", model_dir, "--recipe", "rtn-w8", "--eval-data", path, "--eval-seq-len", "32",
                "--output", out]
    if kind == "data":
        return ["eval", "--model", model_dir, "--data", path, "--seq-len", "32"]
    if kind in ("task", "behaviour"):
        return ["eval", "--model", model_dir, f"--{kind}", path]
    raise AssertionError(kind)


# -- how each broken input is made: (kind, case) -> builder(tmp, model_dir) -> path -------------------

def _file(name: str, data: bytes | str) -> Callable[[Path, Path], Path]:
    def build(tmp: Path, _model: Path) -> Path:
        p = tmp / name
        p.write_bytes(data.encode() if isinstance(data, str) else data)
        return p
    return build


def _missing(name: str) -> Callable[[Path, Path], Path]:
    return lambda tmp, _m: tmp / name


def _folder(name: str) -> Callable[[Path, Path], Path]:
    def build(tmp: Path, _m: Path) -> Path:
        (tmp / name).mkdir()
        (tmp / name / "README").write_text("a folder, not a file\n")
        return tmp / name
    return build


def _model_with(edit: Callable[[Path], None]) -> Callable[[Path, Path], Path]:
    def build(tmp: Path, model: Path) -> Path:
        d = copy_model(model, tmp / "broken_model")
        edit(d)
        return d
    return build


def _halve(name: str) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[: len(data) // 2])
    return edit


def _replace(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda d: (d / name).write_bytes(data)


def _weights_folder(d: Path) -> None:
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").mkdir()


def _latin1_config(d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg["_comment"] = "mod\u00e8le r\u00e9duit"
    (d / "config.json").write_bytes(json.dumps(cfg, ensure_ascii=False).encode("latin-1"))


def _gptq_yaml() -> str:
    from modelpress.pipeline.recipe import builtin_recipes

    return builtin_recipes()[gptq_recipe_name()].read_text()


def _recipe_latin1(tmp: Path, _m: Path) -> Path:
    p = tmp / "latin1.yaml"
    p.write_bytes(_gptq_yaml().replace("description:", "description: r\u00e9sum\u00e9,").encode("latin-1"))
    return p


def _recipe_truncated(tmp: Path, _m: Path) -> Path:
    p = tmp / "half.yaml"
    p.write_text(recipe_text_half(_gptq_yaml()))
    return p


def _jsonl(rows: list) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


_GOOD_JSONL = _jsonl([{"text": TEXT[i:i + 900]} for i in range(0, len(TEXT), 900)])

CASES: dict[str, dict[str, Callable[[Path, Path], Path]]] = {
    "model": {
        "missing": _missing("no_model"),
        "empty-folder": _folder("empty_model"),
        "empty-weights": _model_with(_replace("model.safetensors", b"")),
        "truncated-weights": _model_with(_halve("model.safetensors")),
        "truncated-config": _model_with(_halve("config.json")),
        "binary-weights": _model_with(_replace("model.safetensors", BINARY)),
        "binary-weights-with-nul": _model_with(_replace("model.safetensors", BINARY_NUL)),
        "binary-config": _model_with(_replace("config.json", BINARY)),
        "latin1-config": _model_with(_latin1_config),
        "folder-as-weights-file": _model_with(_weights_folder),
        "file-as-model-folder": _file("model.txt", "not a model\n"),
        "binary-file-as-model": _file("model.dat", BINARY),
    },
    "recipe": {
        "missing": _missing("no_recipe.yaml"),
        "empty": _file("empty.yaml", b""),
        "truncated": _recipe_truncated,
        "binary": _file("binary.yaml", BINARY),
        "binary-with-nul": _file("binary_nul.yaml", BINARY_NUL),
        "latin1": _recipe_latin1,
        "folder": _folder("recipe.yaml"),
    },
    "calib": {
        "missing": _missing("no_calib.txt"),
        "empty-txt": _file("empty.txt", b""),
        "empty-jsonl": _file("empty.jsonl", b""),
        "truncated-jsonl": _file("half.jsonl", _GOOD_JSONL[: len(_GOOD_JSONL) // 2]),
        "truncated-txt-mid-character": _file("cut.txt", utf8_cut_mid_char(LATIN1_TEXT)),
        "binary-txt": _file("binary.txt", BINARY),
        "binary-txt-with-nul": _file("binary_nul.txt", BINARY_NUL),
        "binary-jsonl": _file("binary.jsonl", BINARY),
        "latin1-txt": _file("latin1.txt", LATIN1_TEXT.encode("latin-1")),
        "latin1-jsonl": _file("latin1.jsonl", ('{"text": "' + LATIN1_TEXT + '"}\n').encode("latin-1")),
        "folder": _folder("calib.txt"),
    },
}
CASES["data"] = {
    "missing": _missing("no_data.txt"),
    "empty": _file("empty.txt", b""),
    "truncated-mid-character": _file("cut.txt", utf8_cut_mid_char(LATIN1_TEXT)),
    "binary": _file("binary.txt", BINARY),
    "binary-with-nul": _file("binary_nul.txt", BINARY_NUL),
    "latin1": _file("latin1.txt", LATIN1_TEXT.encode("latin-1")),
    "folder": _folder("data.txt"),
}
CASES["eval-data"] = dict(CASES["data"])
CASES["task"] = dict(CASES["data"])  # eval --task FILE.jsonl (content errors: tests/eval/test_tasks.py)
CASES["behaviour"] = dict(CASES["data"])  # eval --behaviour SUITE (content errors: tests/eval/test_behaviour_generation.py)


def _rows():
    out = [pytest.param(k, c, id=f"{k}-{c}") for k, cases in CASES.items() for c in cases]
    # unreadable: a valid input whose open() raises PermissionError
    out += [pytest.param(k, "unreadable", id=f"{k}-unreadable") for k in CASES]
    return out


def _valid_input(kind: str, tmp: Path, model_dir: Path, text_file: Path) -> Path:
    if kind == "model":
        return copy_model(model_dir, tmp / "model_copy")
    if kind == "recipe":
        from modelpress.pipeline.recipe import builtin_recipes

        p = tmp / "recipe.yaml"
        p.write_text(builtin_recipes()["rtn-w8"].read_text())
        return p
    p = tmp / "input.txt"
    p.write_text(TEXT)
    return p


@pytest.mark.parametrize("kind, case", _rows())
def test_bad_input_file(kind, case, cli, model_dir, text_file, tmp_path, monkeypatch):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    if case == "unreadable":
        path = _valid_input(kind, inputs, model_dir, text_file)
        make_unreadable(monkeypatch, path)
    else:
        path = CASES[kind][case](inputs, model_dir)
    out_parent = tmp_path / "outputs"
    out_parent.mkdir()
    out = out_parent / "out"
    res = cli(*_argv(kind, path, model_dir, text_file, out))
    needles = (path.name, "Permission denied") if case == "unreadable" else (path.name,)
    assert_user_error(res, *needles, after=lambda: assert_nothing_half_written(out, []))


# -- content errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("row", [
    pytest.param({"text": None}, id="text-null"),
    pytest.param({"text": 3}, id="text-int"),
    pytest.param({"text": ["a"]}, id="text-list"),
    pytest.param({"text": {"a": 1}}, id="text-object"),
    pytest.param(["text", "a"], id="row-is-list"),
    pytest.param("just a string", id="row-is-string"),
    pytest.param({"content": "no text field"}, id="row-without-text"),
])
def test_calibration_jsonl_row_of_wrong_type(row, cli, model_dir, tmp_path):
    """Row 3 is bad (rows 1-2 alone hold enough tokens): exit 2 naming line 3, whatever the row."""
    p = tmp_path / "calib.jsonl"
    p.write_bytes(_jsonl([{"text": TEXT[: len(TEXT) // 2]}, {"text": TEXT[len(TEXT) // 2:]}, row]))
    out = tmp_path / "out"
    res = cli("compress", "--model", model_dir, "--recipe", gptq_recipe_name(), *calib_args(p), "--output", out)
    assert_user_error(res, line_number(3), after=lambda: assert_nothing_half_written(out, []))


@pytest.mark.parametrize("stage_extra, needle", [
    pytest.param("    targets: ['re:(']\n", "re:(", id="invalid-regex-target"),
    pytest.param("    ignore: ['re:[z-a]']\n", "re:[z-a]", id="invalid-regex-ignore"),
])
def test_invalid_regex_selector(stage_extra, needle, cli, model_dir, tmp_path):
    rec = tmp_path / "r.yaml"
    rec.write_text("stages:\n  - method: rtn\n" + stage_extra + "    format: {type: int, bits: 8}\n")
    res = cli("compress", "--model", model_dir, "--recipe", rec, "--output", tmp_path / "out")
    assert_user_error(res, needle, after=lambda: assert_nothing_half_written(tmp_path / "out", []))


@pytest.mark.parametrize("text", [pytest.param("stages: []\n", id="only-stages"),
                                  pytest.param("name: nothing\nstages: []\n", id="named")])
def test_recipe_without_stages_refused(text, cli, model_dir, tmp_path):
    rec = tmp_path / "r.yaml"
    rec.write_text(text)
    res = cli("compress", "--model", model_dir, "--recipe", rec, "--output", tmp_path / "out")
    assert_user_error(res, after=lambda: assert_nothing_half_written(tmp_path / "out", []))


@pytest.fixture(scope="module")
def pickled_model_dir(tmp_path_factory) -> Path:
    """A transformers folder whose only weights are a pickled pytorch_model.bin."""
    d = tmp_path_factory.mktemp("pickled") / "model"
    d.mkdir()
    m = make_tiny_llama()
    m.config.save_pretrained(str(d))
    torch.save(m.state_dict(), d / "pytorch_model.bin")
    make_tokenizer(d)
    assert not list(d.glob("*.safetensors"))
    return d


@pytest.mark.parametrize("cmd", ["compress", "eval"])
def test_pickled_weights_refused(cmd, cli, pickled_model_dir, text_file, tmp_path):
    out = tmp_path / "out"
    argv = (["compress", "--model", pickled_model_dir, "--recipe", "rtn-w8", "--output", out] if cmd == "compress"
            else ["eval", "--model", pickled_model_dir, "--data", text_file, "--seq-len", "32"])
    line = assert_user_error(cli(*argv), after=lambda: assert_nothing_half_written(out, []))
    assert "weights_only" not in line, f"the refusal should not expose torch.load details: {line!r}"


def _poison(d: Path, name: str, index: tuple, value: float) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(str(d / "model.safetensors"))
    assert name in sd, sorted(sd)
    sd[name][index] = value
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("tensor, index, value", [
    pytest.param("model.layers.0.input_layernorm.weight", (3,), float("nan"), id="nan-in-norm"),
    pytest.param("model.norm.weight", (0,), float("nan"), id="nan-in-final-norm"),
    pytest.param("model.embed_tokens.weight", (5, 2), float("inf"), id="inf-in-embedding"),
])
@pytest.mark.parametrize("cmd", ["compress", "eval"])
def test_non_finite_weights_named(cmd, tensor, index, value, cli, model_dir, text_file, tmp_path):
    bad = copy_model(model_dir, tmp_path / "bad")
    _poison(bad, tensor, index, value)
    out = tmp_path / "out"
    argv = (["compress", "--model", bad, "--recipe", "rtn-w8", "--output", out] if cmd == "compress"
            else ["eval", "--model", bad, "--data", text_file, "--seq-len", "32", "--json", tmp_path / "e.json"])
    def clean():
        assert_nothing_half_written(out, [])
        assert not (tmp_path / "e.json").exists(), "eval wrote a result for a model with non-finite weights"

    assert_user_error(cli(*argv), tensor, after=clean)


#: A hub look-up with retries takes 25 s and more; a local "not found" well under a second, but the
#: shared 2-core machine can stall a process for seconds, so the bound leaves room for that.
FAST_FAIL_S = 10.0


def test_mistyped_relative_model_folder_fails_fast(model_dir, tmp_path):
    """``out/typo`` with ``out/`` present is a local path that does not exist, not a hub id to retry."""
    import subprocess

    (tmp_path / "out").mkdir()
    build_model_dir(tmp_path / "out" / "real")  # the folder the user meant
    marks = tmp_path / "marks"
    cmd = driver_cmd(["compress", "--model", "out/typo", "--recipe", "rtn-w8", "--output", "res"], marks=marks)
    env = driver_env(HF_HUB_OFFLINE=None, TRANSFORMERS_OFFLINE=None)
    timed_out = False
    with open(tmp_path / "stderr", "w") as err, open(tmp_path / "stdout", "w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=err, text=True)
        try:
            deadline = time.monotonic() + 120
            while "START" not in (marks.read_text() if marks.exists() else ""):
                assert proc.poll() is None, f"driver ended early: {(tmp_path / 'stderr').read_text()[-2000:]}"
                assert time.monotonic() < deadline, "driver did not start"
                time.sleep(0.05)
            t0 = time.monotonic()
            try:
                proc.wait(timeout=FAST_FAIL_S)
            except subprocess.TimeoutExpired:
                timed_out = True
            elapsed = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if timed_out:
        pytest.fail(f"--model out/typo still running after {FAST_FAIL_S} s (hub look-up / retries?); stderr so far: "
                    f"{(tmp_path / 'stderr').read_text()[-1500:]!r}")
    res = Result(cmd, proc.returncode, (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text(), None, "",
                 elapsed)
    assert_user_error(res, "out/typo", "not found", after=lambda: assert_nothing_half_written(tmp_path / "res", []))
    assert elapsed < FAST_FAIL_S
