"""The working folder a run owns: ``<workdir>/modelpress-run``, never the user's folder itself.

The user's ``--workdir`` (or the default ``OUTPUT.work``) may hold anything; modelpress creates
one subfolder there, marks it as its own, keeps checkpoints and offloaded activations in it, and
removes only that subfolder when the run is done (and the parent only when modelpress created it
and it is left empty). A subfolder of that name without the marker, or one in use by a live run,
is refused rather than overwritten.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from ..core.errors import EnvironmentFailure, ModelpressError
from ..core.outputs import pid_alive

RUN_DIR = "modelpress-run"
MARKER = "modelpress-run.json"


class RunFolder:
    """Create, reuse (to resume) and remove a run's own working folder.

    Example:
        >>> rf = RunFolder("out/model.work", remove_parent_if_empty=True)  # doctest: +SKIP
        >>> path = rf.open()      # out/model.work/modelpress-run             # doctest: +SKIP
        >>> rf.close()            # removes the subfolder, then the empty parent  # doctest: +SKIP
    """

    def __init__(self, workdir: str | os.PathLike, *, remove_parent_if_empty: bool = False) -> None:
        self.parent = Path(workdir)
        self.path = self.parent / RUN_DIR
        self.remove_parent_if_empty = remove_parent_if_empty
        self._created_parent = False

    def open(self) -> Path:
        """Create (or take over after a killed run) the run folder; returns its path."""
        self._check_ours()
        self._created_parent = not self.parent.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / MARKER).write_text(json.dumps({"owner": "modelpress", "pid": os.getpid()}))
        except OSError as e:
            self.close()  # what this call created goes again (an empty folder: nothing of the user's)
            raise EnvironmentFailure.from_os_error(e, "create", self.path) from None
        return self.path

    def _check_ours(self) -> None:
        if not self.path.exists():
            return
        marker = self.path / MARKER
        if self.path.is_dir() and not any(self.path.iterdir()):
            return  # empty: a kill between creating it and writing the marker
        if not self.path.is_dir() or not marker.is_file():
            raise ModelpressError(f"{self.path} exists and was not made by modelpress; choose another --workdir")
        try:
            pid = int(json.loads(marker.read_text()).get("pid", 0))
        except (ValueError, AttributeError):
            pid = 0
        if pid and pid != os.getpid() and pid_alive(pid):
            raise ModelpressError(f"{self.path} is in use by another modelpress run (pid {pid})")

    def clear(self) -> None:
        """Empty the run folder (a different job's checkpoint), keeping it and its marker."""
        for p in self.path.iterdir():
            if p.name != MARKER:
                shutil.rmtree(p) if p.is_dir() else p.unlink()

    def close(self) -> None:
        """Remove the run folder, and its parent if modelpress made that and it is now empty."""
        if self.path.is_dir() and ((self.path / MARKER).is_file() or not any(self.path.iterdir())):
            shutil.rmtree(self.path, ignore_errors=True)
        if self._created_parent or self.remove_parent_if_empty:
            with contextlib.suppress(OSError):
                self.parent.rmdir()  # only succeeds when empty: the user's files always stay
