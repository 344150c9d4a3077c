"""Fixtures of the robustness suite: tiny models and inputs built in code, a user area, an
in-process CLI runner whose output is captured at the file-descriptor level.

Tiny models come from ``tests/conftest.py`` (``make_tiny_llama``, ``make_tokenizer``); every
compress here takes well under a second.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from tests.conftest import TEXT

from .support import build_model_dir, make_user_area, rebind_consoles, run_cli, run_main


@pytest.fixture(autouse=True)
def _robust_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Per test: internal-error logs under tmp, consoles writing to the captured stream, the torch
    thread count restored (bench sets it)."""
    monkeypatch.setenv("MODELPRESS_LOG_DIR", str(tmp_path / "_logs"))
    monkeypatch.setenv("MODELPRESS_PROGRESS", "0")
    for name in ("modelpress.cli.main", "modelpress.cli.commands"):  # their consoles exist before any call
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    rebind_consoles()
    threads = torch.get_num_threads()
    yield
    rebind_consoles()  # modules first imported during this test bound their consoles to its stream
    torch.set_num_threads(threads)


@pytest.fixture
def cli(capfd: pytest.CaptureFixture) -> Any:
    """``cli("compress", "--model", ...)`` -> :class:`support.Result` (``--quiet`` added)."""

    def call(*argv: Any, **kw: Any):
        rebind_consoles()
        return run_cli(capfd, *argv, **kw)

    return call


@pytest.fixture
def area(tmp_path: Path) -> Path:
    """A user's working folder: thesis.tex, src/main.c, data/notes.txt ... (see support.USER_FILES)."""
    return make_user_area(tmp_path / "area")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2-block tiny Llama folder (read-only by convention: copy it before breaking it)."""
    return build_model_dir(tmp_path_factory.mktemp("robust_model") / "llama")


@pytest.fixture(scope="session")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small English text: calibration and evaluation data."""
    p = tmp_path_factory.mktemp("robust_text") / "text.txt"
    p.write_text(TEXT)
    return p


@pytest.fixture(scope="session")
def compressed_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A modelpress output folder (rtn-w4-g32 of ``model_dir``); read-only by convention."""
    out = tmp_path_factory.mktemp("robust_compressed") / "w4"
    assert run_main("compress", "--model", model_dir, "--recipe", "rtn-w4-g32", "--output", out) == 0
    return out
