"""Files the CLI writes besides models (JSON results), written so a failure never leaves half a file."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as JSON atomically (a temporary file renamed over ``path``: never half a file)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.parent / f".{p.name}.tmp-{os.getpid()}"
    try:
        tmp.write_text(json.dumps(obj, indent=2, default=str))
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()
