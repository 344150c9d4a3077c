"""End-to-end CLI tests on a tiny Llama built in code (runs in seconds, no hub)."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from modelpress.cli.main import main


def run(*argv: str) -> int:
    return main(["--quiet", *map(str, argv)])


@pytest.fixture(scope="module")
def compressed(tiny_llama_dir, tiny_text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "w4"
    rc = run("compress", "--model", tiny_llama_dir, "--recipe", "rtn-w4-g32", "--output", out,
             "--eval-data", tiny_text_file, "--eval-seq-len", "64")
    assert rc == 0
    return out


def test_compress_writes_packed_model_and_report(compressed):
    files = {p.name for p in compressed.iterdir()}
    assert {"model.safetensors", "config.json", "modelpress.json", "report.json", "report.md"} <= files
    man = json.loads((compressed / "modelpress.json").read_text())
    assert len(man["layers"]) == 14
    assert all(abs(v["bits_per_weight"] - (4 + 16 / 32)) < 1e-9 for v in man["layers"].values())
    from safetensors import safe_open

    with safe_open(str(compressed / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert "model.layers.0.mlp.down_proj.qweight" in keys and "model.layers.0.mlp.down_proj.weight" not in keys
        assert f.get_tensor("model.layers.0.mlp.down_proj.qweight").dtype == torch.uint8
    rep = json.loads((compressed / "report.json").read_text())
    assert rep["eval"]["compressed"]["perplexity"] > 0 and rep["eval"]["delta_ppl_pct"] is not None


def test_eval_json_contract_and_reload_matches(compressed, tiny_text_file, tmp_path):
    out = tmp_path / "e.json"
    assert run("eval", "--model", compressed, "--data", tiny_text_file, "--seq-len", "64", "--json", out) == 0
    res = json.loads(out.read_text())
    assert {"perplexity", "tokens", "seq_len", "params", "size_bytes"} <= set(res)
    rep = json.loads((compressed / "report.json").read_text())
    # reloading the packed folder gives exactly the in-memory compressed model's perplexity
    assert res["perplexity"] == pytest.approx(rep["eval"]["compressed"]["perplexity"], rel=1e-6)
    assert res["seq_len"] == 64


def test_existing_output_refused_then_overwrite(compressed, tiny_llama_dir, capsys):
    assert run("compress", "--model", tiny_llama_dir, "--recipe", "rtn-w8", "--output", compressed) == 2
    err = capsys.readouterr().err
    assert "exists" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, needle", [
    (["compress", "--model", "/nonexistent/model", "--recipe", "rtn-w8", "--output", "{tmp}/o"], "not found"),
    (["compress", "--model", "{model}", "--recipe", "nope", "--output", "{tmp}/o"], "built-ins"),
    (["eval", "--model", "{model}", "--data", "/nonexistent.txt"], "data file not found"),
])
def test_bad_input_is_one_line_exit_2(argv, needle, tiny_llama_dir, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, model=tiny_llama_dir) for a in argv]
    assert run(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_target_matching_nothing(tiny_llama_dir, tmp_path, capsys):
    rec = tmp_path / "r.yaml"
    rec.write_text("stages:\n  - method: rtn\n    targets: ['role:down_prj']\n    format: {type: int, bits: 4}\n")
    assert run("compress", "--model", tiny_llama_dir, "--recipe", rec, "--output", tmp_path / "o") == 2
    assert "role:down_prj" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_nan_weight_named(tiny_llama_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama_dir, bad)
    sd = load_file(str(bad / "model.safetensors"))
    sd["model.layers.1.mlp.up_proj.weight"][0, 3] = float("nan")
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    assert run("compress", "--model", bad, "--recipe", "rtn-w8", "--output", tmp_path / "o") == 2
    assert "model.layers.1.mlp.up_proj.weight" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp*"))


def test_truncated_output_detected(compressed, tmp_path, tiny_text_file, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(compressed, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert run("eval", "--model", broken, "--data", tiny_text_file, "--seq-len", "64") == 2
    assert "sha256" in capsys.readouterr().err


def test_inspect_and_recipes(compressed, capsys, tmp_path):
    assert run("inspect", "--model", compressed, "--json", tmp_path / "i.json") == 0
    info = json.loads((tmp_path / "i.json").read_text())
    down = [r for r in info["layers"] if r["name"] == "model.layers.0.mlp.down_proj"][0]
    assert down["role"] == "down_proj" and down["format"]["bits"] == 4
    assert run("recipes") == 0
    assert "rtn-w4-g128" in capsys.readouterr().out
    assert run("recipes", "rtn-w8") == 0
    assert "bits: 8" in capsys.readouterr().out


def test_calibration_size_flags_then_the_recipes_then_128_x_2048():
    """A built-in that trains on its calibration text runs at the size it was measured at unless the
    flags say otherwise; a recipe that names no size keeps GPTQ's usual 128 x 2048."""
    from modelpress.cli.commands import calibration_size
    from modelpress.cli.main import build_parser
    from modelpress.pipeline.recipe import load_recipe

    def size(recipe: str, *flags: str) -> tuple[int, int]:
        args = build_parser().parse_args(["compress", "--model", "m", "--recipe", recipe, "--output", "o", *flags])
        return calibration_size(args, load_recipe(recipe))

    for name in ("qat-w3-g64", "qat-w4-g64", "qat-w8a8"):
        assert size(name) == (64, 512)
    assert size("qat-w2-g64") == (256, 512)  # W2 trains Block-AP on 4x the sequences
    assert size("qat-w3-g64", "--calib-seq-len", "1024") == (64, 1024)
    assert size("qat-w3-g64", "--calib-samples", "8", "--calib-seq-len", "128") == (8, 128)
    assert size("gptq-w4-g128") == (128, 2048)
    assert size("gptq-w4-g128", "--calib-samples", "16") == (16, 2048)
