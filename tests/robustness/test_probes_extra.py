"""I. Probes of issue 16 that the rest of the suite does not pin down.

- Sizes: a GGUF's "size on disk" is its file, not the fp32 copy transformers makes of it in RAM
  (``eval --baseline`` of a GGUF reported 538 MB for a 98 MB file); a compress report's sizes are
  the bytes of the weight files, and its ratio is made of those.
- The texts shipped with modelpress: ``bundled:c4`` is the calibration default of calibrated recipes
  and is recorded as such, ``bundled:wikitext2`` the evaluation default; an unknown name is one line
  listing the shipped ones; the shipped texts are the usual files (same perplexity / same windows).
- ``hf:`` sources without the ``datasets`` package or without a hub: one line, exit 2, nothing
  downloaded (the package is stubbed or told it is offline).
- The issue's exact reproductions where the suite checks a neighbour: a pickled ``pytorch_model.bin``
  whose pickle torch's ``weights_only`` loader refuses, ``{"text": null}`` as the first JSONL row, a
  single-file source (GGUF) replaced between an interrupted run and its resume, the mistyped relative
  folder timed on the command itself (not on interpreter exit, which takes seconds on a loaded machine).
- Found while writing these (and fixed): a compress refused after its working folder was made left
  that folder; a user error after a GGUF is loaded came with a progress bar.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from tests.conftest import SHARED

from .support import (assert_nothing_half_written, assert_ok, assert_user_error, build_model_dir, calib_args,
                      digest_diff, driver_cmd, driver_env, gptq_recipe_name, line_number, output_digest, run_main)

EVAL_SMALL = ["--seq-len", "32", "--max-tokens", "128"]


def _weight_bytes(folder: Path) -> int:
    """Bytes of an output's weight files (what "size on disk" promises to be)."""
    files = [p for p in folder.iterdir() if p.suffix in (".safetensors", ".gguf", ".bin", ".pt")]
    assert files, f"no weight files in {folder}: {sorted(p.name for p in folder.iterdir())}"
    return sum(p.stat().st_size for p in files)


def _export_gguf(model: Path, out: Path) -> Path:
    assert run_main("export", "--model", model, "--format", "gguf", "--gguf-type", "F32", "--output", out) == 0
    assert out.is_file()
    return out


@pytest.fixture(scope="module")
def gguf_file(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 2-block tiny Llama as a GGUF (float weights as F16: the file is about half its fp32 size in RAM)."""
    pytest.importorskip("gguf")
    return _export_gguf(model_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


# ------------------------------------------------------------------------------------------------------
# Sizes: bytes of files on disk, not bytes in RAM
# ------------------------------------------------------------------------------------------------------

def test_eval_size_of_a_gguf_model_is_its_file(cli, gguf_file, model_dir, text_file, tmp_path):
    """``eval --model X.gguf --baseline Y --json``: size_bytes = os.path.getsize(X.gguf); memory_bytes = RAM."""
    j, md = tmp_path / "e.json", tmp_path / "e.md"
    res = cli("eval", "--model", gguf_file, "--baseline", model_dir, "--data", text_file, *EVAL_SMALL,
              "--json", j, "--markdown", md)
    assert_ok(res)
    d = json.loads(j.read_text())
    gguf_bytes = os.path.getsize(gguf_file)
    assert d["size_bytes"] == gguf_bytes, \
        f"size_bytes of a GGUF model should be its file's {gguf_bytes} bytes, got {d['size_bytes']} " \
        f"(memory_bytes {d.get('memory_bytes')})"
    assert d["memory_bytes"] != gguf_bytes and d["memory_bytes"] == d["baseline"]["memory_bytes"], \
        "memory_bytes should be the fp32 model in RAM (the same as the float baseline's), not the file"
    assert d["baseline"]["size_bytes"] == _weight_bytes(model_dir)
    assert {"size_bytes", "memory_bytes"} <= set(d.get("measures", {})), "the JSON should say what each size measures"
    printed = json.loads(res.out.strip().splitlines()[-1])
    assert printed["size_bytes"] == gguf_bytes
    ratio = gguf_bytes / _weight_bytes(model_dir)
    assert f"| size on disk, compressed / baseline | | {ratio:.3f} |" in md.read_text()


def test_eval_with_a_gguf_baseline_compares_file_sizes(cli, gguf_file, compressed_dir, text_file, tmp_path):
    """The issue's comparison: a compressed output against the GGUF it came from, both by their files."""
    j, md = tmp_path / "e.json", tmp_path / "e.md"
    assert_ok(cli("eval", "--model", compressed_dir, "--baseline", gguf_file, "--data", text_file, *EVAL_SMALL,
                  "--json", j, "--markdown", md))
    d = json.loads(j.read_text())
    assert d["baseline"]["size_bytes"] == os.path.getsize(gguf_file), d["baseline"]
    assert d["size_bytes"] == _weight_bytes(compressed_dir), d
    ratio = _weight_bytes(compressed_dir) / os.path.getsize(gguf_file)
    assert f"| size on disk, compressed / baseline | | {ratio:.3f} |" in md.read_text()


@pytest.mark.parametrize("source", ["gguf", "hf-folder"])
def test_compress_report_sizes_are_bytes_of_files(source, cli, gguf_file, model_dir, text_file, tmp_path):
    model = gguf_file if source == "gguf" else model_dir
    out = tmp_path / "out"
    assert_ok(cli("compress", "--model", model, "--recipe", "rtn-w4-g32", "--eval-data", text_file,
                  "--eval-seq-len", "32", "--eval-max-tokens", "128", "--output", out))
    rep = json.loads((out / "report.json").read_text())
    ev = rep["eval"]
    base_bytes = os.path.getsize(gguf_file) if source == "gguf" else _weight_bytes(model_dir)
    out_bytes = _weight_bytes(out)
    assert ev["baseline"]["size_bytes"] == base_bytes, \
        f"baseline size should be the source's files ({base_bytes} bytes), got {ev['baseline']['size_bytes']}"
    assert ev["compressed"]["size_bytes"] == out_bytes, \
        f"compressed size should be the output's weight files ({out_bytes} bytes), got {ev['compressed']['size_bytes']}"
    assert rep["size_bytes"] == out_bytes
    assert ev["size_bytes_ratio"] == pytest.approx(out_bytes / base_bytes, rel=1e-12), ev


# ------------------------------------------------------------------------------------------------------
# Texts shipped with modelpress
# ------------------------------------------------------------------------------------------------------

def _bundled_file(name: str) -> Path:
    from modelpress.data.sources import bundled_path

    return bundled_path(f"bundled:{name}")


def test_calibrated_recipe_without_calib_uses_bundled_c4(cli, model_dir, tmp_path):
    import hashlib

    out = tmp_path / "out"
    res = cli("compress", "--model", model_dir, "--recipe", gptq_recipe_name(), "--calib-samples", "4",
              "--calib-seq-len", "32", "--output", out)
    assert_ok(res)
    cal = json.loads((out / "modelpress.json").read_text()).get("calibration")
    assert cal and cal["source"] == "bundled:c4", f"the manifest should record bundled:c4, got {cal}"
    assert cal["sha256"] == hashlib.sha256(_bundled_file("c4").read_bytes()).hexdigest()
    assert (cal["samples"], cal["seq_len"]) == (4, 32)
    report = json.loads((out / "report.json").read_text())
    assert any("bundled:c4" in w for w in report["warnings"]), "the report should say the shipped text was used"


def test_eval_without_data_uses_bundled_wikitext2(cli, model_dir, tmp_path):
    j = tmp_path / "e.json"
    assert_ok(cli("eval", "--model", model_dir, *EVAL_SMALL, "--json", j))
    d = json.loads(j.read_text())
    assert d["data"] == "bundled:wikitext2" and d["tokens"] == 128 and d["seq_len"] == 32, d
    assert 1.0 < d["perplexity"] < 1e6


@pytest.mark.parametrize("where", ["eval-data", "calib", "compress-eval-data"])
def test_unknown_bundled_name_is_one_line_listing_the_shipped_ones(where, cli, model_dir, tmp_path):
    out = tmp_path / "out"
    argv = {"eval-data": ["eval", "--model", model_dir, "--data", "bundled:nope", *EVAL_SMALL],
            "calib": ["compress", "--model", model_dir, "--recipe", gptq_recipe_name(), "--calib", "bundled:nope",
                      "--output", out],
            "compress-eval-data": ["compress", "--model", model_dir, "--recipe", "rtn-w8",
                                   "--eval-data", "bundled:nope", "--output", out]}[where]
    assert_user_error(cli(*argv), "nope", "bundled:c4", "bundled:wikitext2", after=_no_leftovers(out))


def _wiki_raw() -> Path:
    p = SHARED / "wikitext2" / "wiki.test.raw"
    if not p.is_file():
        pytest.skip(f"shared data wikitext2/wiki.test.raw not present at {p} (set MODELPRESS_SHARED)")
    return p


def test_bundled_wikitext2_is_wiki_test_raw_with_join_lines(cli, model_dir, tmp_path):
    """Same text (whole), and through the CLI the same perplexity on the same tokens."""
    from modelpress.data.sources import read_text

    raw = _wiki_raw()
    assert read_text("bundled:wikitext2") == read_text(raw, join_lines=True), \
        "bundled:wikitext2 is not wiki.test.raw with --join-lines"
    results = []
    for name, argv in (("bundled", ["--data", "bundled:wikitext2"]), ("raw", ["--data", raw, "--join-lines"])):
        j = tmp_path / f"{name}.json"
        assert_ok(cli("eval", "--model", model_dir, *argv, "--seq-len", "64", "--max-tokens", "2048", "--json", j))
        results.append(json.loads(j.read_text()))
    a, b = results
    assert (a["tokens"], a["perplexity"]) == (b["tokens"], b["perplexity"]), (a, b)


def test_bundled_c4_gives_the_windows_of_the_c4_shard(cli, model_dir, tmp_path):
    """``bundled:c4`` calibrates on the same token ids as the first documents of the C4 shard."""
    shard = SHARED / "c4" / "c4_en_train_first1000.jsonl"
    if not shard.is_file():
        pytest.skip(f"shared data c4/c4_en_train_first1000.jsonl not present at {shard} (set MODELPRESS_SHARED)")
    docs = [json.loads(x)["text"] for x in gzip.decompress(_bundled_file("c4").read_bytes()).decode().splitlines()]
    first = [json.loads(x)["text"] for x in shard.read_text().splitlines()[:len(docs)]]
    assert len(docs) == 600 and docs == first, "bundled:c4's texts are not the shard's first documents"
    digests = []
    for name, calib in (("bundled", "bundled:c4"), ("shard", shard)):
        out = tmp_path / name
        assert_ok(cli("compress", "--model", model_dir, "--recipe", gptq_recipe_name(),
                      *calib_args(calib, samples=4, seq_len=32), "--output", out))
        digests.append(json.loads((out / "modelpress.json").read_text())["calibration"]["tokens_sha256"])
    assert digests[0] == digests[1]


# ------------------------------------------------------------------------------------------------------
# hf: sources without datasets / without a hub (nothing is downloaded)
# ------------------------------------------------------------------------------------------------------

HF_CASES = {
    "eval-data": lambda m, o: ["eval", "--model", m, "--data", "hf:Salesforce/wikitext:wikitext-2-raw-v1:test",
                               *EVAL_SMALL],
    "calib": lambda m, o: ["compress", "--model", m, "--recipe", gptq_recipe_name(),
                           "--calib", "hf:allenai/c4:en:train", "--calib-samples", "4", "--calib-seq-len", "32",
                           "--output", o],
    "compress-eval-data": lambda m, o: ["compress", "--model", m, "--recipe", "rtn-w8", "--eval-data",
                                        "hf:Salesforce/wikitext:wikitext-2-raw-v1:test", "--eval-seq-len", "32",
                                        "--output", o],
}


def _no_leftovers(out: Path):
    def check() -> None:
        assert_nothing_half_written(out, [])
        assert not Path(f"{out}.work").exists(), f"a refused run left its working folder {out}.work"
    return check


@pytest.mark.parametrize("where", list(HF_CASES))
def test_hf_source_without_datasets_package(where, cli, model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    out = tmp_path / "out"
    assert_user_error(cli(*HF_CASES[where](model_dir, out)), "datasets", after=_no_leftovers(out))


class _FailingStream:
    """A streamed dataset whose first row raises (the connection drops when reading starts)."""

    def __init__(self, err: Exception) -> None:
        self.err = err

    def __iter__(self):
        raise self.err


class _Unreachable:
    """A stand-in for the ``datasets`` package when the hub cannot be reached: ``load_dataset`` (or the
    first row of its stream) raises what datasets raises then (a ConnectionError)."""

    def __init__(self, when: str) -> None:
        self.when, self.calls = when, []

    def load_dataset(self, name, config=None, split=None, streaming=False, **kw):
        self.calls.append((name, config, split, streaming))
        err = ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")
        if self.when == "load":
            raise err

        return _FailingStream(err)


@pytest.mark.parametrize("when", ["load", "first-row"])
@pytest.mark.parametrize("where", list(HF_CASES))
def test_hf_source_with_hub_unreachable(where, when, cli, model_dir, tmp_path, monkeypatch):
    fake = _Unreachable(when)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake.load_dataset))
    out = tmp_path / "out"
    res = cli(*HF_CASES[where](model_dir, out))
    assert_user_error(res, "Couldn't reach", after=_no_leftovers(out))
    assert fake.calls and fake.calls[0][3] is True, f"hf: sources should be streamed: {fake.calls}"


def test_hf_source_offline_with_the_real_datasets_package(model_dir, text_file, tmp_path):
    """The real ``datasets`` with ``HF_HUB_OFFLINE=1`` (no network use), in a real process."""
    pytest.importorskip("datasets")
    cmd = driver_cmd(["eval", "--model", model_dir, "--data", "hf:Salesforce/wikitext:wikitext-2-raw-v1:test",
                      *EVAL_SMALL])
    p = subprocess.run(cmd, cwd=tmp_path, env=driver_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"),
                       capture_output=True, text=True, timeout=300, check=False)
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("modelpress: error:"), p.stderr[-2000:]
    assert "Traceback" not in p.stderr


# ------------------------------------------------------------------------------------------------------
# The exact reproductions
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cmd", ["compress", "eval"])
def test_pickle_with_a_non_tensor_object_refused(cmd, cli, model_dir, text_file, tmp_path):
    """A pytorch_model.bin holding a non-tensor object: torch.load(weights_only=True) raises and suggests
    ``weights_only=False``; modelpress must refuse in one line without that advice."""
    import fractions

    import torch
    from safetensors.torch import load_file

    d = tmp_path / "pickled"
    shutil.copytree(model_dir, d)
    sd = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    torch.save({**sd, "training_step": fractions.Fraction(1, 3)}, d / "pytorch_model.bin")
    out = tmp_path / "out"
    argv = (["compress", "--model", d, "--recipe", "rtn-w8", "--output", out] if cmd == "compress"
            else ["eval", "--model", d, "--data", text_file, *EVAL_SMALL])
    line = assert_user_error(cli(*argv), "pytorch_model.bin", after=lambda: assert_nothing_half_written(out, []))
    assert "weights_only" not in line, f"the refusal should not pass on torch.load's advice: {line!r}"


def test_jsonl_text_null_in_the_first_row(cli, model_dir, text_file, tmp_path):
    """The issue's row: ``{"text": null}`` read first (test_input_files puts it after enough text,
    where the old code never looked), a one-line error naming line 1."""
    p = tmp_path / "calib.jsonl"
    p.write_text(json.dumps({"text": None}) + "\n" + json.dumps({"text": text_file.read_text()}) + "\n")
    out = tmp_path / "out"
    res = cli("compress", "--model", model_dir, "--recipe", gptq_recipe_name(), *calib_args(p), "--output", out)
    assert_user_error(res, "calib.jsonl", line_number(1), after=_no_leftovers(out))


def test_mistyped_relative_model_folder_is_refused_at_once(tmp_path):
    """``--model out/typo`` (``out/`` exists): refused in well under a second, no hub retries.

    Timed inside the process (the driver's ELAPSED mark), so a slow interpreter exit on a loaded
    machine does not count; the process itself gets 120 s to end.
    """
    (tmp_path / "out").mkdir()
    build_model_dir(tmp_path / "out" / "real")
    marks = tmp_path / "marks"
    cmd = driver_cmd(["compress", "--model", "out/typo", "--recipe", "rtn-w8", "--output", "res"], marks=marks)
    env = driver_env(HF_HUB_OFFLINE=None, TRANSFORMERS_OFFLINE=None, HF_DATASETS_OFFLINE=None)
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
                       check=False)
    text = marks.read_text() if marks.exists() else ""
    elapsed = [float(x.split()[1]) for x in text.splitlines() if x.startswith("ELAPSED")]
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode == 2 and len(lines) == 1, f"rc {p.returncode}, stderr:\n{p.stderr[-2000:]}"
    assert lines[0].startswith("modelpress: error:") and "out/typo" in lines[0] and "not found" in lines[0], lines
    assert elapsed and elapsed[0] < 3.0, f"the command took {elapsed} s (hub look-up / retries?)"
    assert not (tmp_path / "res").exists()


class _Interrupt(KeyboardInterrupt):
    pass


def test_single_file_source_replaced_after_interruption_is_not_spliced(cli, text_file, tmp_path, monkeypatch):
    """GGUF A is compressed until after block 0's checkpoint (Ctrl-C), GGUF B is copied to the same
    path, the same command runs again: the result is B's, as a fresh run of B gives. A control
    rerun without the swap resumes (so the first part did leave a checkpoint to resume from)."""
    pytest.importorskip("gguf")
    from modelpress.pipeline import sequential

    src = tmp_path / "src"
    a = _export_gguf(build_model_dir(src / "a", seed=0, layers=3), src / "a.gguf")
    b = _export_gguf(build_model_dir(src / "b", seed=1, layers=3), src / "b.gguf")
    model = tmp_path / "model.gguf"
    real_save = sequential.Checkpointer.save

    def interrupted(out: Path) -> None:
        calls = {"n": 0}

        def save(self, *args, **kw):
            real_save(self, *args, **kw)
            calls["n"] += 1
            if calls["n"] == 1:
                raise _Interrupt()

        with monkeypatch.context() as mp:
            mp.setattr(sequential.Checkpointer, "save", save)
            res = cli("compress", "--model", model, "--recipe", gptq_recipe_name(), *calib_args(text_file),
                      "--output", out)
        assert calls["n"] == 1, f"the run never reached its first checkpoint:\n{res.describe()}"
        assert not out.exists() and Path(f"{out}.work").exists(), "the interrupted run left no checkpoint"

    def run(out: Path) -> dict:
        assert_ok(cli("compress", "--model", model, "--recipe", gptq_recipe_name(), *calib_args(text_file),
                      "--output", out))
        return json.loads((out / "report.json").read_text())

    # control: the same file again resumes from the checkpoint
    shutil.copyfile(a, model)
    interrupted(tmp_path / "control")
    rep = run(tmp_path / "control")
    assert any("resumed" in w for w in rep["warnings"]), f"the control run did not resume: {rep['warnings']}"

    # the swap: another model at the same path
    interrupted(tmp_path / "out")
    time.sleep(0.01)
    shutil.copyfile(b, model)
    rep = run(tmp_path / "out")
    assert not any("resumed" in w for w in rep["warnings"]), \
        f"resumed a checkpoint of the replaced file: {rep['warnings']}"
    run(tmp_path / "fresh")
    diff = digest_diff(output_digest(tmp_path / "fresh"), output_digest(tmp_path / "out"))
    assert not diff, "the rerun spliced checkpointed blocks of the replaced file:\n  " + "\n  ".join(diff)


# ------------------------------------------------------------------------------------------------------
# Found while writing this file, then fixed
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["already-compressed", "selector-matches-nothing"])
def test_refused_compress_leaves_no_working_folder(case, cli, model_dir, compressed_dir, tmp_path):
    out = tmp_path / "out"
    if case == "already-compressed":
        argv = ["compress", "--model", compressed_dir, "--recipe", "rtn-w8", "--output", out]
    else:
        rec = tmp_path / "r.yaml"
        rec.write_text("stages:\n  - method: rtn\n    targets: ['role:no_such_role']\n")
        argv = ["compress", "--model", model_dir, "--recipe", rec, "--output", out]
    assert_user_error(cli(*argv), after=_no_leftovers(out))


def test_user_error_after_loading_a_gguf_is_one_line(cli, gguf_file, text_file):
    res = cli("eval", "--model", gguf_file, "--data", text_file, "--seq-len", "100000")
    assert_user_error(res, "100000")
