"""Progress bars (rich) for every loop over layers, blocks or batches; silent when disabled."""
from __future__ import annotations

import os
import sys
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def progress_enabled() -> bool:
    return os.environ.get("MODELPRESS_PROGRESS", "1") != "0"


def silence_libraries() -> None:
    """Turn off the progress bars and chatter of transformers and huggingface_hub (``--quiet``).

    Their bars ("Loading weights", "Converting GGUF tensors") and load reports go to stderr, where
    a script expects only modelpress's own lines (one line on failure).
    """
    os.environ["MODELPRESS_PROGRESS"] = "0"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TQDM_DISABLE"] = "1"  # bars libraries draw with tqdm directly (GGUF conversion, gguf-py)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import sys

    if "transformers" in sys.modules:  # already imported: its settings are read at import time
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


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

