"""Run lm-evaluation-harness tasks on a loaded model (optional: needs ``pip install 'modelpress[lm-eval]'``).

The harness gets our already-loaded module and tokenizer through its ``HFLM`` wrapper, so a
compressed model is evaluated as modelpress holds it. A task is a harness task name (its data
comes from the Hugging Face hub, so it needs the hub or a local datasets cache) or the path of a
task YAML file (its folder is added to the harness's include path).

Example:
    >>> run_lm_eval(lm, ["hellaswag"], limit=100)   # doctest: +SKIP
    {'hellaswag': {'acc': 0.41, 'acc_norm': 0.52, ...}}
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..core.errors import ModelpressError
from ..models.loaded import LoadedModel

MISSING = ("lm-eval tasks need the lm-eval package, which is not installed here: "
           "pip install 'modelpress[lm-eval]' (or use --task FILE.jsonl, which needs nothing more)")


def available() -> bool:
    """Whether ``lm_eval`` can be imported."""
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


def _task_names(tasks: Sequence[str]) -> tuple[list[str], list[str]]:
    """(harness task names, folders to include) from names and YAML paths."""
    import yaml

    names, include = [], []
    for t in tasks:
        p = Path(t)
        if p.suffix in (".yaml", ".yml"):
            if not p.is_file():
                raise ModelpressError(f"lm-eval task file not found: {p}")
            try:
                name = (yaml.safe_load(p.read_text(encoding="utf-8")) or {}).get("task")
            except (yaml.YAMLError, UnicodeDecodeError, AttributeError) as e:
                raise ModelpressError(f"{p}: not an lm-eval task YAML ({str(e).splitlines()[0]})") from None
            if not isinstance(name, str):
                raise ModelpressError(f"{p}: an lm-eval task YAML needs a 'task: NAME' line")
            names.append(name)
            include.append(str(p.resolve().parent))
        else:
            names.append(t)
    return names, sorted(set(include))


def harness_model(lm: LoadedModel, batch_size: int = 8) -> Any:
    """Our module and tokenizer wrapped as the harness's ``HFLM``."""
    if not available():
        raise ModelpressError(MISSING)
    from lm_eval.models.huggingface import HFLM

    hf_tok = getattr(lm.tokenizer, "tok", None)
    if hf_tok is None:
        raise ModelpressError(f"lm-eval needs a Hugging Face tokenizer; {lm.source} has {type(lm.tokenizer).__name__}")
    return HFLM(pretrained=lm.module, tokenizer=hf_tok, batch_size=batch_size, max_length=lm.max_length)


def run_lm_eval(lm: LoadedModel, tasks: Sequence[str], *, limit: int | None = None, batch_size: int = 8) -> dict[str, Any]:
    """Each task's metrics (``{task: {metric: value}}``) as the harness computes them."""
    names, include = _task_names(tasks)
    model = harness_model(lm, batch_size)
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include or None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise ModelpressError(f"lm-eval has no task {unknown[0]!r} (pass a harness task name or a task YAML file)")
    try:
        res = lm_eval.simple_evaluate(model=model, tasks=names, limit=limit, task_manager=manager,
                                      log_samples=False, bootstrap_iters=0)
    except (OSError, ConnectionError, ValueError, RuntimeError) as e:  # the harness's own failures: data, hub
        raise ModelpressError(f"lm-eval task(s) {', '.join(names)} failed: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None
    return {task: {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "alias"}
            for task, metrics in res["results"].items()}
