"""``modelpress export`` end to end from a modelpress output folder; bad input is one line, exit 2."""
from __future__ import annotations

import json

import pytest

import modelpress as mp
import modelpress.cli.commands  # noqa: F401  (binds its console to stderr before any capsys test)
from modelpress.cli.main import main
from tests.conftest import make_tiny_llama


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    lm = mp.load(make_tiny_llama(seed=8))
    mp.compress(lm, "rtn-w4-g32", progress=False)
    return mp.save(lm, tmp_path_factory.mktemp("mp") / "w4", recipe="rtn-w4-g32")


def test_cli_exports_every_format(saved, tmp_path, capsys):
    assert main(["--quiet", "export", "--model", str(saved), "--format", "compressed-tensors",
                 "--output", str(tmp_path / "ct")]) == 0
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "pack-quantized" and cfg["quantization_status"] == "compressed"
    assert main(["export", "--model", str(saved), "--format", "gguf", "--gguf-type", "Q4_0",
                 "--output", str(tmp_path / "m.gguf")]) == 0
    report = json.loads((tmp_path / "m.export.json").read_text())
    assert report["counts"]["lossless"] == 14  # int4 sym g32 is Q4_0's grid
    assert main(["export", "--model", str(saved), "--format", "hf", "--output", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").exists()
    assert "14 lossless" in capsys.readouterr().err


@pytest.mark.parametrize("argv,msg", [
    (["--format", "gguf", "--output", "{tmp}/x"], "must be a .gguf file path"),
    (["--format", "gguf", "--gguf-type", "Q3_K", "--output", "{tmp}/x.gguf"], "--gguf-type Q3_K"),
    (["--format", "hf", "--gguf-type", "Q4_0", "--output", "{tmp}/h"], "does not apply to --format hf"),
    (["--format", "hf", "--output", "{saved}"], "exists; pass --overwrite"),
])
def test_cli_bad_input_is_one_line_exit_2(saved, tmp_path, capsys, argv, msg):
    argv = [a.format(tmp=tmp_path, saved=saved) for a in argv]
    assert main(["export", "--model", str(saved), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0]
