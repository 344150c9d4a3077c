"""Invariant 5: an interrupted block-wise run resumes, with the same workdir, to identical files.

Rows: every registered block-wise method (``StageKind.BLOCKWISE`` / ``RECONSTRUCTION`` with
checkpoints) with its defaults on RESUME_ARCHS, and the GPTQ defaults on every architecture.
The interruption is engine-independent: a forward pre-hook on block 1 raises ``KeyboardInterrupt``
(standing in for a kill) the first time block 1 runs, i.e. after block 0 was compressed and
checkpointed. The rerun starts again from the float model, as a new process would.
"""
from __future__ import annotations

import copy
import hashlib
import shutil
import tempfile
from pathlib import Path

import pytest

import modelpress as mp
from modelpress.core.method import METHODS

from . import harness as H
from .archs import ARCHS
from .cells import accepted_variants
from .rows import is_blockwise

RESUME_ARCHS = ("llama", "gpt2", "mixtral")
REPORTS = ("report.json", "report.md")  # timings: the only files allowed to differ


def _rows() -> list[tuple[str, str]]:
    blockwise = [m for m, e in METHODS.items() if is_blockwise(m) and e.checkpoints]
    rows = [(a, m) for a in RESUME_ARCHS for m in blockwise]
    rows += [(a.name, "gptq") for a in ARCHS if a.name not in RESUME_ARCHS and "gptq" in blockwise]
    return rows


ROWS = _rows()


def _defaults(method: str):
    return next(v for v in accepted_variants() if v.method == method and v.group == "defaults")


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and p.name not in REPORTS}


class _Interrupt:
    """Raise KeyboardInterrupt the first time the model's block 1 is entered."""

    def __init__(self, model) -> None:
        blocks = H.find_blocks(model)
        self.fired = False
        self.handle = blocks[1].register_forward_pre_hook(self._hook) if len(blocks) > 1 else None

    def _hook(self, *_):
        if not self.fired:
            self.fired = True
            raise KeyboardInterrupt


@pytest.mark.parametrize("arch,method", ROWS, ids=[f"{a}-{m}" for a, m in ROWS])
def test_interrupted_run_resumes_to_identical_files(arch: str, method: str) -> None:
    stage = _defaults(method).stage
    tmp = Path(tempfile.mkdtemp(prefix="conf-resume-"))
    try:
        try:
            ref, ref_report = H.compress(arch, stage)
        except Exception as e:  # noqa: BLE001
            if H.is_one_line_refusal(e):
                pytest.skip(f"{method} refuses {arch}: {e}")
            pytest.fail(f"{arch}-{method}: uninterrupted run crashed: {H.describe(e)}")
        ref_dir = mp.save(ref, tmp / "ref", report=ref_report)

        lm = mp.load(copy.deepcopy(H.float_model(arch)))
        stop = _Interrupt(lm.module)
        try:
            mp.compress(lm, {"name": "conformance", "stages": [stage]}, calib=H.calib_ids(), progress=False,
                        workdir=tmp / "work")
        except KeyboardInterrupt:
            pass
        if not stop.fired:
            pytest.skip(f"{method} never runs the model's block 1 (it works on copies): nothing to interrupt")

        fresh = mp.load(copy.deepcopy(H.float_model(arch)))  # a new process starts from the float model
        report = mp.compress(fresh, {"name": "conformance", "stages": [stage]}, calib=H.calib_ids(), progress=False,
                             workdir=tmp / "work")
        out_dir = mp.save(fresh, tmp / "resumed", report=report)
        a, b = _digests(ref_dir), _digests(out_dir)
        diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        assert not diff, f"{arch}-{method}: the resumed run's files differ from an uninterrupted run's: {diff}"
        assert any("resum" in w.lower() for w in report.get("warnings", [])), (
            f"{arch}-{method}: the rerun did not resume from the checkpoint of block 0 (no 'resumed' note "
            f"in the report's warnings: {report.get('warnings')})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
