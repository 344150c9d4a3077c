"""The built-in activation-sparsity recipes run end to end through the CLI, and the saved folder
evaluates to the same perplexity as the in-memory model."""
import json

import pytest

from modelpress.cli.main import main


@pytest.mark.parametrize("recipe", ["teal-40", "dejavu-50"])
def test_builtin_recipe_compress_then_eval(recipe, tiny_llama_dir, tiny_text_file, tmp_path):
    out = tmp_path / recipe
    rc = main(["--quiet", "compress", "--model", str(tiny_llama_dir), "--recipe", recipe, "--output", str(out),
               "--calib", str(tiny_text_file), "--calib-samples", "4", "--calib-seq-len", "64",
               "--eval-data", str(tiny_text_file), "--eval-seq-len", "64"])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["layers"] and all(r["method"] == recipe.split("-")[0] for r in rep["layers"])
    res = tmp_path / "e.json"
    assert main(["--quiet", "eval", "--model", str(out), "--data", str(tiny_text_file), "--seq-len", "64",
                 "--json", str(res)]) == 0
    assert json.loads(res.read_text())["perplexity"] == pytest.approx(rep["eval"]["compressed"]["perplexity"], rel=1e-6)
