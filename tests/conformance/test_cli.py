"""The command line end to end for every architecture, and models loaded from GGUF files.

* ``compress -> eval -> export --format hf`` through ``modelpress.cli.main.main`` in-process, with
  RTN W8 (``rtn-w8``) and GPTQ W4 (``gptq-w4-g64``, the main job's recipe) on each tiny model saved
  as an HF folder with a tokenizer. Exit 0 is required; exit 2 with one line is a clean refusal
  (skipped, with its message); exit 1 is a bug (the failure quotes the logged traceback's last line).
  The ``hf`` export reloads in plain transformers with the outputs of the compressed folder.
* A folder written by ``save_pretrained`` loads (``modelpress.load``) as the model it holds.
* A bad recipe on the command line exits 2 with one line naming the field.
* A model whose config has no ``architectures`` entry (what a GGUF file or ``from_config`` gives),
  compressed, saved and reloaded, for every decoder architecture.
* GGUF: the tiny llama (the one architecture the GGUF writer maps today; extend GGUF_ARCHS as it
  learns more) exported with ``modelpress export --format gguf --gguf-type F32``, loaded from the
  ``.gguf``, compressed with both recipes, saved and reloaded; and through ``compress`` and
  ``eval`` on the CLI.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import modelpress as mp
from modelpress.cli.main import main
from tests.conftest import TEXT, make_tokenizer
from tests.robustness.support import rebind_consoles

from . import harness as H
from .archs import ARCHS, BY_NAME

RECIPES = ("rtn-w8", "gptq-w4-g64")
CALIB = ["--calib-samples", "4", "--calib-seq-len", "32"]
EVAL = ["--max-tokens", "64", "--seq-len", "32"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("conf-cli")
    (root / "text.txt").write_text(TEXT)
    make_tokenizer(root / "tok")
    return {"root": root, "text": root / "text.txt", "models": {}}


def _model_dir(ws: dict[str, Any], arch: str) -> Path:
    """The arch's float model as an HF folder with the shared tokenizer (written once)."""
    if arch not in ws["models"]:
        d = ws["root"] / f"model-{arch}"
        H.float_model(arch).save_pretrained(str(d))
        for f in (ws["root"] / "tok").iterdir():
            shutil.copy(f, d / f.name)
        ws["models"][arch] = d
    return ws["models"][arch]


def _cli(args: list[str], capsys: pytest.CaptureFixture, log_dir: Path) -> tuple[int, str]:
    """Run the CLI in-process; (exit code, its last stderr line plus, for exit 1, where it crashed)."""
    rebind_consoles()  # rich consoles made at import time would write to an earlier test's closed capture
    rc = main(["--quiet", *args])
    err = capsys.readouterr().err.strip()
    line = err.splitlines()[-1] if err else ""
    if rc == 1:
        logs = sorted(log_dir.glob("*.log"))
        if logs:
            tb = [ln for ln in logs[-1].read_text().splitlines() if ln.strip()]
            frames = [ln.strip() for ln in tb if ln.strip().startswith('File "') and "/modelpress/" in ln]
            line += f" | {frames[-1] if frames else ''} | {tb[-1]}"
    return rc, line


def _step(name: str, rc: int, line: str, where: str) -> None:
    if rc == 2:
        pytest.skip(f"{where}: {name} refused cleanly: {line}")
    assert rc == 0, f"{where}: `modelpress {name}` exit {rc}: {line}"


@pytest.mark.parametrize("arch", [a.name for a in ARCHS])
def test_hf_folder_loads(arch: str, workspace) -> None:
    """A folder written by transformers' ``save_pretrained`` loads with the model it holds."""
    folder = _model_dir(workspace, arch)
    try:
        lm = mp.load(str(folder))
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"{arch}: modelpress refuses the folder transformers wrote for "
                    f"{type(H.float_model(arch)).__name__}: {H.describe(e)}")
    ref, got = H.outputs(H.float_model(arch)), H.outputs(lm.module)
    assert got.shape == ref.shape and torch.equal(got, ref), (
        f"{arch}: loaded as {type(lm.module).__name__}, outputs {tuple(got.shape)} differ from "
        f"{type(H.float_model(arch)).__name__}'s {tuple(ref.shape)}")


CASES = [(a.name, r) for a in ARCHS for r in RECIPES]


@pytest.mark.parametrize("arch,recipe", CASES, ids=[f"{a}-{r}" for a, r in CASES])
def test_cli_compress_eval_export(arch: str, recipe: str, workspace, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("MODELPRESS_LOG_DIR", str(tmp_path / "logs"))
    model, text, where = _model_dir(workspace, arch), str(workspace["text"]), f"{arch} {recipe}"
    out, ev, hf = tmp_path / "out", tmp_path / "eval.json", tmp_path / "hf"
    rc, line = _cli(["compress", "--model", str(model), "--recipe", recipe, "--output", str(out),
                     "--calib", text, *CALIB], capsys, tmp_path / "logs")
    _step("compress", rc, line, where)
    rc, line = _cli(["eval", "--model", str(out), "--data", text, *EVAL, "--json", str(ev)], capsys, tmp_path / "logs")
    _step("eval", rc, line, where)
    ppl = json.loads(ev.read_text()).get("perplexity")
    assert isinstance(ppl, float) and math.isfinite(ppl), f"{where}: eval gives perplexity {ppl!r}"
    rc, line = _cli(["export", "--model", str(out), "--format", "hf", "--output", str(hf)], capsys, tmp_path / "logs")
    _step("export --format hf", rc, line, where)
    import transformers

    auto = transformers.AutoModelForMaskedLM if BY_NAME[arch].encoder else transformers.AutoModelForCausalLM
    dense = auto.from_pretrained(str(hf), dtype=torch.float32).eval()
    ref = H.outputs(mp.load(str(out)).module)
    got = H.outputs(dense)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max())), (
        f"{where}: the hf export gives other outputs than the compressed folder (rel {H.rel(got, ref):.3e})")


def test_cli_bad_recipe_exits_2_naming_the_field(workspace, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("MODELPRESS_LOG_DIR", str(tmp_path / "logs"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  - method: gptq\n    format: {type: int, bits: 4, granularity: sideways}\n")
    rc, line = _cli(["compress", "--model", str(_model_dir(workspace, "llama")), "--recipe", str(bad),
                     "--output", str(tmp_path / "out")], capsys, tmp_path / "logs")
    assert rc == 2 and "stages[0].format.granularity" in line, f"exit {rc}: {line}"


# ---- models whose config names no architecture (GGUF files, models built from a config) ----------
DECODERS = [a.name for a in ARCHS if not a.encoder]


@pytest.mark.parametrize("arch", DECODERS)
def test_model_without_architectures_reloads_after_compression(arch: str, tmp_path: Path) -> None:
    """A config without ``architectures`` (what transformers gives for a GGUF file or ``from_config``)."""
    import copy

    module = copy.deepcopy(H.float_model(arch))
    module.config.architectures = None
    lm = mp.load(module)
    report = mp.compress(lm, "rtn-w8", progress=False)
    folder = mp.save(lm, tmp_path / "out", recipe="rtn-w8", report=report)
    try:
        back = mp.load(str(folder))
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"{arch} without config.architectures, rtn-w8: the saved folder does not reload: {H.describe(e)}")
    a, b = H.outputs(lm.module), H.outputs(back.module)
    assert a.shape == b.shape and torch.equal(a, b), (
        f"{arch} without config.architectures: reloaded as {type(back.module).__name__}, outputs "
        f"{tuple(b.shape)} differ from {type(lm.module).__name__}'s {tuple(a.shape)}")


@pytest.fixture(scope="module")
def gguf_files(workspace) -> dict[str, Path | str]:
    """arch -> its F32 GGUF export, or the one-line refusal of the GGUF writer (written on demand)."""
    pytest.importorskip("gguf")
    return {}


def _gguf(arch: str, files: dict[str, Path | str], ws: dict[str, Any], capsys, log_dir: Path) -> Path:
    if arch not in files:
        out = ws["root"] / f"{arch}-f32.gguf"
        rc, line = _cli(["export", "--model", str(_model_dir(ws, arch)), "--format", "gguf", "--gguf-type", "F32",
                         "--output", str(out)], capsys, log_dir)
        files[arch] = out if rc == 0 else f"exit {rc}: {line}"
    if isinstance(files[arch], str):
        if files[arch].startswith("exit 2"):
            pytest.skip(f"the GGUF writer refuses {arch}: {files[arch]}")
        pytest.fail(f"GGUF export of the tiny {arch} failed: {files[arch]}")
    return files[arch]


GGUF_ARCHS = ("llama",)  # what the GGUF writer maps today; add an architecture when it learns one
GGUF_CASES = [(a, r) for a in GGUF_ARCHS for r in RECIPES]


@pytest.mark.parametrize("arch,recipe", GGUF_CASES, ids=[f"{a}-{r}" for a, r in GGUF_CASES])
def test_gguf_model_reloads_after_compression(arch: str, recipe: str, gguf_files, workspace, tmp_path: Path,
                                              capsys, monkeypatch) -> None:
    monkeypatch.setenv("MODELPRESS_LOG_DIR", str(tmp_path / "logs"))
    path = _gguf(arch, gguf_files, workspace, capsys, tmp_path / "logs")
    try:
        lm = mp.load(str(path))
    except Exception as e:  # noqa: BLE001
        if H.is_one_line_refusal(e):
            pytest.skip(f"loading the {arch} GGUF is refused: {e}")
        pytest.fail(f"{arch} GGUF written by modelpress does not load: {H.describe(e)}")
    calib = H.calib_ids() if mp.api.needs_calibration(recipe) else None
    report = mp.compress(lm, recipe, calib=calib, progress=False)
    folder = mp.save(lm, tmp_path / "out", recipe=recipe, report=report)
    try:
        back = mp.load(str(folder))
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"{arch} loaded from GGUF (config architectures={lm.module.config.architectures!r}), {recipe}: "
                    f"the compressed folder does not reload: {H.describe(e)}")
    a, b = H.outputs(lm.module), H.outputs(back.module)
    assert a.shape == b.shape and torch.equal(a, b), f"{arch} GGUF {recipe}: outputs differ after save -> load"


def test_gguf_model_through_the_cli(gguf_files, workspace, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("MODELPRESS_LOG_DIR", str(tmp_path / "logs"))
    path, out = _gguf("llama", gguf_files, workspace, capsys, tmp_path / "logs"), tmp_path / "out"
    rc, line = _cli(["compress", "--model", str(path), "--recipe", "gptq-w4-g64", "--output", str(out),
                     "--calib", str(workspace["text"]), *CALIB], capsys, tmp_path / "logs")
    assert rc == 0, f"compress of a .gguf model: exit {rc}: {line}"
    rc, line = _cli(["eval", "--model", str(out), "--data", str(workspace["text"]), *EVAL, "--json",
                     str(tmp_path / "e.json")], capsys, tmp_path / "logs")
    assert rc == 0, f"eval of the compressed GGUF model's folder: exit {rc}: {line}"
