"""Argument types for the CLI: a count of zero or a one-token window is refused where it is typed.

Each type raises ``argparse.ArgumentTypeError``, which the parser turns into one line naming the
option, so a bad number never reaches the (slow) model load.
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Callable

#: Larger thread counts are refused: torch would spawn them all on a machine that has far fewer cores.
MAX_THREADS = 4096


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer: {text!r}") from None


def _at_least(text: str, low: int) -> int:
    v = _int(text)
    if v < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {v}")
    return v


def positive_int(text: str) -> int:
    """An integer >= 1 (counts, lengths, strides)."""
    return _at_least(text, 1)


def nonneg_int(text: str) -> int:
    """An integer >= 0 (seeds)."""
    return _at_least(text, 0)


def window_len(text: str) -> int:
    """A window length: at least two tokens, or there is no next token to predict."""
    v = _int(text)
    if v < 2:
        raise argparse.ArgumentTypeError(f"a window needs at least 2 tokens, got {v}")
    return v


def thread_count(text: str) -> int:
    """Threads: 1 .. MAX_THREADS."""
    v = positive_int(text)
    if v > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"must be <= {MAX_THREADS} (this machine has {os.cpu_count()} cores), got {v}")
    return v


def _float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return v


def positive_float(text: str) -> float:
    """A finite number > 0 (prices, temperatures)."""
    v = _float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return v


def probability(text: str) -> float:
    """A number in (0, 1] (top-p, a similarity threshold)."""
    v = _float(text)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return v


def share(text: str) -> float:
    """A fraction in [0, 1) (of samples to drop)."""
    v = _float(text)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return v


def log_probability(text: str) -> float:
    """A log-probability: a finite number <= 0."""
    v = _float(text)
    if v > 0:
        raise argparse.ArgumentTypeError(f"a log-probability is <= 0, got {text}")
    return v


def positive_int_up_to(limit: int) -> Callable[[str], int]:
    """An integer in 1..``limit`` (a count whose huge values would only exhaust memory)."""

    def check(text: str) -> int:
        v = _at_least(text, 1)
        if v > limit:
            raise argparse.ArgumentTypeError(f"must be <= {limit:,}, got {v:,}")
        return v

    return check
