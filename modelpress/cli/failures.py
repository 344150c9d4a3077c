"""Every CLI failure as exactly one line on stderr.

- user error (:class:`ModelpressError`) and environment failure (``OSError``: disk full, permission
  denied ...): ``modelpress: error: ...``, exit 2;
- anything else is a bug: ``modelpress: internal error: ...`` naming a log file that holds the
  traceback, exit 1. ``--debug`` prints the traceback in place instead.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path

from ..core.errors import EnvironmentFailure, ModelpressError, io_cause


def one_line(text: str) -> str:
    """``text`` with its lines joined: a message must never spill over several lines."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip()) or "(no message)"


def log_dir() -> Path:
    """Where internal-error logs go: ``$MODELPRESS_LOG_DIR``, else ``~/.cache/modelpress/logs``."""
    if os.environ.get("MODELPRESS_LOG_DIR"):
        return Path(os.environ["MODELPRESS_LOG_DIR"])
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "modelpress" / "logs"


def write_log(exc: BaseException) -> Path:
    """Write ``exc``'s traceback (and the command line) to a new log file; returns its path."""
    d = log_dir()
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"modelpress-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    body = "".join(traceback.format_exception(exc))
    path.write_text(f"command: {' '.join(sys.argv)}\n{body}")
    return path


def report_failure(exc: BaseException, *, debug: bool = False) -> int:
    """Print ``exc`` as one line on stderr and return the exit code (re-raises ``SystemExit``)."""
    if isinstance(exc, SystemExit):  # --help / --version: argparse's own normal exit
        raise exc
    if isinstance(exc, KeyboardInterrupt):
        print("modelpress: interrupted", file=sys.stderr)
        return 130
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    user = _as_user_error(exc)
    if user is not None:
        print(f"modelpress: error: {one_line(str(user))}", file=sys.stderr)
        return user.exit_code
    what = f"{type(exc).__name__}: {one_line(str(exc))}"
    if debug:
        print(f"modelpress: internal error: {what}", file=sys.stderr)
        return 1
    try:
        where = f"traceback in {write_log(exc)}"
    except OSError as e:
        where = f"no log written ({e.strerror or e}); rerun with --debug for the traceback"
    print(f"modelpress: internal error: {what} ({where})", file=sys.stderr)
    return 1


def _as_user_error(exc: BaseException) -> ModelpressError | None:
    """The user-facing error ``exc`` stands for, or None when it is a bug."""
    if isinstance(exc, ModelpressError):
        return exc
    if isinstance(exc, OSError):
        return EnvironmentFailure.from_os_error(exc, "use")
    cause = io_cause(exc)
    if cause is not None:  # e.g. safetensors' Rust writer: the OS error arrives as text
        return EnvironmentFailure(f"{cause} ({type(exc).__name__} while reading or writing files)")
    return None
