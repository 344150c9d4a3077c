"""One registration per extension: built-ins found by their family's package, third parties by
entry point; the CLI's choices come from the registries; loading a saved folder imports only the
layer classes it holds."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from modelpress.core.method import METHODS
from modelpress.export.writers import WRITERS
from modelpress.quant.formats.base import FORMATS

ROOT = Path(__file__).resolve().parents[2]


def test_registries_find_the_built_ins_without_a_list():
    assert {"rtn", "gptq", "awq", "sparsegpt", "wanda", "magnitude", "structured"} <= set(METHODS.names())
    assert {"int", "nf4", "fp8", "mxfp4", "nvfp4"} <= set(FORMATS.names())
    assert {"hf", "compressed-tensors", "gguf"} <= set(WRITERS.names())


def test_cli_export_choices_come_from_the_writer_registry():
    from modelpress.cli.main import build_parser

    export = build_parser()._subparsers._group_actions[0].choices["export"]
    fmt = next(a for a in export._actions if a.dest == "export_format")
    assert list(fmt.choices) == WRITERS.names()
    flags = {s for a in export._actions for s in a.option_strings}
    assert {f"--{o.flag}" for w in WRITERS.items() for o in w[1].options} <= flags


def _run(code: str, env: dict | None = None) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_loading_a_quantised_folder_imports_no_other_method(tmp_path):
    import modelpress as mp
    from tests.conftest import make_tiny_llama

    lm = mp.load(make_tiny_llama(seed=1, layers=1))
    mp.compress(lm, "rtn-w4-g32", progress=False)
    mp.save(lm, tmp_path / "q")
    mods = json.loads(_run(f"""
        import json, sys
        from modelpress.models.saved import load_compressed
        load_compressed({str(tmp_path / 'q')!r})
        print(json.dumps(sorted(m for m in sys.modules if m.startswith('modelpress'))))
    """))
    assert "modelpress.quant.qlinear" in mods
    assert not [m for m in mods if m.startswith(("modelpress.sparsity", "modelpress.quant.algos", "modelpress.export",
                                                 "modelpress.pipeline", "modelpress.kernels"))], mods


PLUGIN = '''
"""A third-party modelpress plugin: a method that scales the selected weights by a factor."""
from typing import Literal

import torch

from modelpress.core.method import METHODS, LayerRecord, MethodConfig, MethodEntry
from modelpress.models.selection import select_layers


class ScaleConfig(MethodConfig):
    method: Literal["demo-scale"] = "demo-scale"
    factor: float = 2.0


def run_scale(lm, cfg, ctx):
    for name, m in select_layers(lm, cfg):
        with torch.no_grad():
            m.weight.mul_(cfg.factor)
        ctx.layers.append(LayerRecord(name, "demo-scale", notes=[f"x{cfg.factor}"]))


METHODS.register("demo-scale")(MethodEntry(ScaleConfig, run_scale, summary="demo plugin: scale weights"))
'''


def test_a_plugin_package_adds_a_method_used_from_a_yaml_recipe(tiny_llama_dir, tmp_path):
    pkg = tmp_path / "plugin"
    (pkg / "mp_demo_plugin").mkdir(parents=True)
    (pkg / "mp_demo_plugin" / "__init__.py").write_text(PLUGIN)
    (pkg / "pyproject.toml").write_text(textwrap.dedent("""
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "mp-demo-plugin"
        version = "0.0.1"
        [project.entry-points."modelpress.plugins"]
        demo = "mp_demo_plugin"
        [tool.setuptools]
        packages = ["mp_demo_plugin"]
    """))
    site = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--target", str(site), str(pkg)], capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr[-2000:]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: plugged\nstages:\n  - method: demo-scale\n    factor: 3.0\n    targets: ['re:.*mlp.*']\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "MODELPRESS_PROGRESS": "0"}
    out = subprocess.run([sys.executable, "-m", "modelpress.cli.main", "--quiet", "compress", "--model",
                          str(tiny_llama_dir), "--recipe", str(recipe), "--output", str(tmp_path / "o")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    from safetensors.torch import load_file

    before = load_file(str(tiny_llama_dir / "model.safetensors"))
    after = load_file(str(tmp_path / "o" / "model.safetensors"))
    key = "model.layers.0.mlp.down_proj.weight"
    assert (after[key] - 3.0 * before[key]).abs().max() < 1e-6
    assert (after["model.layers.0.self_attn.q_proj.weight"] == before["model.layers.0.self_attn.q_proj.weight"]).all()
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert {r["method"] for r in report["layers"]} == {"demo-scale"}
    # without the plugin on the path the method is unknown, and the message lists what is registered
    env.pop("PYTHONPATH")
    env["PYTHONPATH"] = str(ROOT)
    bad = subprocess.run([sys.executable, "-m", "modelpress.cli.main", "--quiet", "compress", "--model",
                          str(tiny_llama_dir), "--recipe", str(recipe), "--output", str(tmp_path / "o2")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert bad.returncode == 2 and "unknown method 'demo-scale'" in bad.stderr
