"""Run the modelpress CLI in a fresh process with one fault hook installed (kill and timing tests).

Usage::

    python _driver.py [--fault HOOK:WHEN:K:ACTION] [--marks FILE] -- ARGV...
    python _driver.py --batch JOBS.json RESULTS.json

``--batch`` pays the interpreter start and the torch / transformers imports once: each job of
JOBS.json (``[{"argv": [...], "cwd": ..., "fault": SPEC or null, "stdout": FILE, "stderr": FILE}]``)
runs in its own forked child process, one after the other; RESULTS.json gets each child's exit
status (``-9`` when it was SIGKILLed), as ``subprocess`` reports it.

HOOK is a key of ``HOOKS`` (``checkpoint``, ``save``, ``internal``) or ``module:attr.path``;
WHEN is ``before`` or ``after`` (the wrapped call); K the 1-based call that fires; ACTION ``kill``
(SIGKILL this process: nothing after it runs, no ``finally``, no atexit) or ``raise``
(``RuntimeError("injected internal failure")``). ``--marks FILE``: the driver appends ``START`` to
FILE once the heavy imports are done and ``ELAPSED <seconds>`` after the command, so the caller can
time the command alone (stdout and stderr stay the CLI's own).

Exit status 97: the hook point does not exist any more; update ``HOOKS`` below.
"""
from __future__ import annotations

import importlib
import os
import signal
import sys
import time
from typing import Any

#: The per-block checkpoint writer of the sequential engine. If the engine moves it, point this at
#: the method that writes one block's checkpoint (called once per finished block).
CHECKPOINT_HOOK = "modelpress.pipeline.sequential:Checkpointer.save"
#: Writing an output folder's files (before it is renamed into place).
SAVE_HOOK = "modelpress.export.saving:_write_folder"
#: Something deep that RTN reaches (an "unexpected" failure).
INTERNAL_HOOK = "modelpress.quant.formats:IntFormat.quantize"

HOOKS = {"checkpoint": CHECKPOINT_HOOK, "save": SAVE_HOOK, "internal": INTERNAL_HOOK}


def _resolve(spec: str) -> tuple[Any, str, Any]:
    """(owner object, attribute name, current value) of ``module:attr.path``."""
    mod_name, _, path = spec.partition(":")
    owner: Any = importlib.import_module(mod_name)
    parts = path.split(".")
    for p in parts[:-1]:
        owner = getattr(owner, p)
    return owner, parts[-1], getattr(owner, parts[-1])


def install(fault: str) -> None:
    hook, when, k, action = fault.split(":")
    spec = HOOKS.get(hook, hook.replace("/", ":"))
    try:
        owner, attr, original = _resolve(spec)
    except (ImportError, AttributeError) as e:
        print(f"driver: hook point {spec} not found ({e}); update tests/robustness/_driver.py", file=sys.stderr)
        sys.exit(97)
    calls = {"n": 0}

    def fire() -> None:
        if action == "kill":
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError("injected internal failure")

    def wrapper(*a: Any, **kw: Any) -> Any:
        calls["n"] += 1
        if when == "before" and calls["n"] == int(k):
            fire()
        result = original(*a, **kw)
        if when == "after" and calls["n"] == int(k):
            fire()
        return result

    setattr(owner, attr, wrapper)


def _import_heavy() -> None:
    import torch

    torch.set_num_threads(1)  # the same arithmetic as the in-process runs (tests/conftest.py)
    import transformers

    # The lazy modules a tiny-Llama compress needs (seconds of imports), loaded once: so that
    # --marks times the command only, and forked batch children start warm. No torch op runs here
    # (a fork after OpenMP threads exist is unsafe).
    _ = (transformers.AutoConfig, transformers.AutoModelForCausalLM, transformers.AutoTokenizer,
         transformers.PreTrainedTokenizerFast, transformers.LlamaConfig, transformers.LlamaForCausalLM)
    for name in ("safetensors.torch", "modelpress.api", "modelpress.cli.main", "modelpress.cli.commands",
                 "modelpress.export.saving", "modelpress.calib.data", "modelpress.pipeline.sequential",
                 "modelpress.eval.report"):
        try:
            importlib.import_module(name)
        except ImportError:  # moved by a refactor: only a warm-up, the command imports what it needs
            pass
    from modelpress.core.method import METHODS

    METHODS.names()  # imports every method module once, before the fork


def run_batch(jobs_file: str, results_file: str) -> int:
    """Each job in a forked child (fresh state, real SIGKILL); statuses to ``results_file``."""
    import json

    _import_heavy()
    statuses = []
    for job in json.loads(open(jobs_file).read()):
        pid = os.fork()
        if pid == 0:  # the child: becomes the CLI process of this job and never returns
            _child(job)
        _, status = os.waitpid(pid, 0)
        statuses.append(-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
    with open(results_file, "w") as f:
        json.dump(statuses, f)
    return 0


def _child(job: dict) -> None:
    import traceback

    rc = 1
    try:
        os.chdir(job["cwd"])
        for fd, name in ((1, "stdout"), (2, "stderr")):
            target = os.open(job[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        if job.get("fault"):
            install(job["fault"])
        from modelpress.cli.main import main as cli_main

        rc = cli_main([str(a) for a in job["argv"]])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001  (as an uncaught exception would: traceback, exit 1)
        traceback.print_exc()
        rc = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)


def main() -> int:
    argv = sys.argv[1:]
    if argv and argv[0] == "--batch":
        return run_batch(argv[1], argv[2])
    sep = argv.index("--")
    opts, cli_argv = argv[:sep], argv[sep + 1:]
    _import_heavy()
    from modelpress.cli.main import main as cli_main

    marks = None
    for i, o in enumerate(opts):
        if o == "--fault":
            install(opts[i + 1])
        if o == "--marks":
            marks = opts[i + 1]
    _mark(marks, "START")
    t0 = time.perf_counter()
    rc = cli_main(cli_argv)
    _mark(marks, f"ELAPSED {time.perf_counter() - t0:.3f}")
    return rc


def _mark(path: str | None, line: str) -> None:
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    sys.exit(main())
