"""Progress bars (rich) for every loop over layers, blocks or batches; silent when disabled."""
from __future__ import annotations

import os
import sys
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def progress_enabled() -> bool:
    return os.environ.get("MODELPRESS_PROGRESS", "1") != "0"


def track(items: Iterable[T], description: str) -> Iterator[T]:
    """Iterate ``items`` showing a rich progress bar on stderr."""
    items = list(items)
    if not progress_enabled() or not items:
        yield from items
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console(file=sys.stderr)
    cols = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn())
    with Progress(*cols, console=console, transient=not console.is_terminal) as prog:
        task = prog.add_task(description, total=len(items))
        for it in items:
            yield it
            prog.advance(task)

