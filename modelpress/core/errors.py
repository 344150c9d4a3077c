"""Errors a user can act on: one line, exit code 2, never a traceback.

Two kinds reach the CLI as one line: :class:`ModelpressError` (bad input: a path, a recipe, a
model that cannot be used) and :class:`EnvironmentFailure` (the machine said no: disk full,
permission denied), which names the path and the cause. Anything else is a bug: the CLI writes
its traceback to a log file and exits 1.
"""
from __future__ import annotations

import errno
import os


class ModelpressError(Exception):
    """An error caused by user input (bad path, bad recipe, bad weights).

    The CLI prints ``str(err)`` on one line and exits with code 2.
    """

    exit_code = 2


class EnvironmentFailure(ModelpressError):
    """The environment refused an operation (disk full, permission denied, read-only filesystem).

    Example:
        >>> str(EnvironmentFailure.from_os_error(OSError(28, "No space left on device", "/o/x"), "write"))
        'cannot write /o/x: No space left on device'
    """

    @classmethod
    def from_os_error(cls, e: OSError, action: str = "write", path: str | os.PathLike | None = None) -> "EnvironmentFailure":
        """One line naming the path and the cause of ``e``."""
        where = e.filename if e.filename is not None else path
        cause = e.strerror or (errno.errorcode.get(e.errno, "") if e.errno else "") or str(e)
        target = f" {os.fspath(where)}" if where is not None else ""
        return cls(f"cannot {action}{target}: {cause}")


#: safetensors reports OS errors of its Rust writer in its own exception text; these map them back.
_RUST_IO_KINDS = {"StorageFull": "No space left on device", "PermissionDenied": "Permission denied",
                  "ReadOnlyFilesystem": "Read-only file system", "QuotaExceeded": "Disk quota exceeded",
                  "NotFound": "No such file or directory"}


def io_cause(e: BaseException) -> str | None:
    """The OS cause inside a non-OSError exception (safetensors' Rust I/O errors), or None."""
    text = str(e)
    for kind, cause in _RUST_IO_KINDS.items():
        if f"kind: {kind}" in text or cause in text:
            return cause
    return None
