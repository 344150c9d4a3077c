"""User-facing errors: one line, exit code 2, never a traceback."""
from __future__ import annotations


class ModelpressError(Exception):
    """An error caused by user input (bad path, bad recipe, bad weights).

    The CLI prints ``str(err)`` on one line and exits with code 2.
    """

    exit_code = 2
