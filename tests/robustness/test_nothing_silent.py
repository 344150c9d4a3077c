"""F. Nothing silent: a broken output is refused, not measured; the same inputs give the same bytes;
the output records what it was calibrated on; compressing a compressed model is handled.
"""
from __future__ import annotations

import json
import re
import shutil

from .support import (TIMED_FILES, assert_absent, assert_ok, assert_ok_or_user_error, assert_user_error, calib_args,
                      gptq_recipe_name, sha256_path)


def _file_digests(folder) -> dict[str, str]:
    return {p.name: sha256_path(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name not in TIMED_FILES}


def test_eval_refuses_an_output_without_its_manifest(cli, compressed_dir, text_file, tmp_path):
    broken = tmp_path / "no_manifest"
    shutil.copytree(compressed_dir, broken)
    (broken / "modelpress.json").unlink()
    res = cli("eval", "--model", broken, "--data", text_file, "--seq-len", "32", "--json", tmp_path / "e.json")
    assert_user_error(res, after=lambda: assert_absent(tmp_path / "e.json", "eval wrote a result for a broken output"))


def test_same_inputs_give_the_same_bytes(cli, model_dir, text_file, tmp_path):
    """Two runs, two outputs: every file but report.json / report.md is byte-identical (sha256)."""
    outs = [tmp_path / "a" / "out", tmp_path / "b" / "out"]
    for out in outs:
        assert_ok(cli("compress", "--model", model_dir, "--recipe", gptq_recipe_name(), *calib_args(text_file),
                      "--output", out))
    a, b = (_file_digests(o) for o in outs)
    diff = [f"{k}: {a.get(k, 'missing')[:12]} vs {b.get(k, 'missing')[:12]}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]
    detail = ""
    if "modelpress.json" in (d.split(":")[0] for d in diff):
        ma, mb = (json.loads((o / "modelpress.json").read_text()) for o in outs)
        detail = "\nmodelpress.json differs in: " + ", ".join(
            sorted({k for k in set(ma) | set(mb) if ma.get(k) != mb.get(k)}
                   | {f"files.{f}" for f in set(ma.get("files", {})) | set(mb.get("files", {}))
                      if ma.get("files", {}).get(f) != mb.get("files", {}).get(f)}))
    assert not diff, "two identical runs wrote different bytes:\n  " + "\n  ".join(diff) + detail


def test_weights_file_bytes_do_not_depend_on_the_run(cli, model_dir, tmp_path):
    """Eight quick runs: model.safetensors is the same file every time.

    safetensors stores ``__metadata__`` in hash order, random per call: with two or more metadata
    keys, two writes differ in header bytes. Eight runs catch that with probability 1 - 2**-7.
    """
    digests = set()
    for i in range(8):
        out = tmp_path / f"o{i}"
        assert_ok(cli("compress", "--model", model_dir, "--recipe", "rtn-w8", "--output", out))
        digests.add(sha256_path(out / "model.safetensors"))
    assert len(digests) == 1, f"model.safetensors differs between identical runs ({len(digests)} variants)"


def test_manifest_records_the_calibration(cli, model_dir, text_file, tmp_path):
    out = tmp_path / "out"
    assert_ok(cli("compress", "--model", model_dir, "--recipe", gptq_recipe_name(),
                  *calib_args(text_file, samples=4, seq_len=32), "--calib-seed", "7", "--output", out))
    man = json.loads((out / "modelpress.json").read_text())
    assert "calibration" in man, f"modelpress.json has no 'calibration' record (keys: {sorted(man)})"
    cal = man["calibration"]
    missing = {"source", "sha256", "samples", "seq_len", "seed"} - set(cal)
    assert not missing, f"calibration record lacks {sorted(missing)}: {cal}"
    assert str(text_file) in str(cal["source"]) or text_file.name in str(cal["source"]), cal
    assert re.fullmatch(r"[0-9a-f]{64}", str(cal["sha256"])), f"calibration sha256 is not a sha256: {cal}"
    assert (cal["samples"], cal["seq_len"], cal["seed"]) == (4, 32, 7), cal


def test_compressing_a_compressed_model(cli, compressed_dir, text_file, tmp_path):
    """An output folder as --model: works or is refused in one line, never a traceback."""
    out = tmp_path / "out"
    for recipe, extra in (("rtn-w8", []), (gptq_recipe_name(), calib_args(text_file))):
        res = cli("compress", "--model", compressed_dir, "--recipe", recipe, *extra, "--output", out / recipe)
        assert_ok_or_user_error(res, after=lambda: assert_absent(out / recipe, "refused, yet an output was written"))
