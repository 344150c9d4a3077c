"""One evaluation run beyond perplexity: task files, agreement with a baseline, behaviour, lm-eval.

:func:`evaluate_beyond_ppl` is what ``modelpress eval --task / --behaviour / --lm-eval`` calls. Each
task file gives ``acc`` / ``acc_norm`` (multiple choice) or ``exact_match`` (generation), the same
for the baseline, the flip rate between the two, and per-slice tables (labels in the data, prompt
length and rare-token rate buckets) with far-worse slices flagged. With a baseline, next-token KL
and top-1 agreement are measured on a text.

Example:
    >>> out = evaluate_beyond_ppl(lm, EvalPlan(tasks=("hellaswag.jsonl",)), baseline=base)  # doctest: +SKIP
    >>> out["tasks"]["hellaswag"]["acc_norm"], out["tasks"]["hellaswag"]["flip_rate"]         # doctest: +SKIP
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

from ..core.errors import ModelpressError
from ..models.loaded import LoadedModel
from . import behaviour as B
from .agreement import flips, next_token_agreement
from .generation import score_generation
from .loglik import score_choices
from .slices import derived_slices, slice_table
from .tasks import ChoiceItem, Task, TaskKind, read_task

#: The text whose token frequencies define "rare" for the rare-token slices.
RARE_REFERENCE = "bundled:c4"
#: Tokens of the agreement text used when no --max-tokens is given.
AGREEMENT_TOKENS = 8192


@dataclass(frozen=True)
class EvalPlan:
    """What to evaluate besides perplexity (paths and names as the user gave them)."""

    tasks: tuple[str, ...] = ()
    behaviour: str | None = None
    lm_eval: tuple[str, ...] = ()
    limit: int | None = None
    agreement_text: str = "bundled:wikitext2"
    agreement_tokens: int = AGREEMENT_TOKENS
    seq_len: int | None = None
    join_lines: bool | None = None
    token_budget: int = 1024
    slices: bool = True
    rare_reference: str = RARE_REFERENCE


def read_plan_inputs(plan: EvalPlan) -> tuple[list[Task], list[B.Prompt] | None]:
    """Read and check every task file and the suite (before any model is loaded)."""
    tasks = [read_task(t, plan.limit) for t in plan.tasks]
    names = [t.name for t in tasks]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ModelpressError(f"two task files are both named {dup!r} (reports key tasks by file stem); rename one")
    return tasks, (B.read_suite(plan.behaviour) if plan.behaviour else None)


def check_same_tokenizer(lm: LoadedModel, base: LoadedModel) -> None:
    """Refuse a baseline whose tokenizer differs (answers and distributions would not be comparable)."""
    ta, tb = lm.tokenizer, base.tokenizer
    if ta is None or tb is None:
        raise ModelpressError("comparing with a baseline needs both models to have a tokenizer")
    probe = "The quick brown fox, 1234 \u2014 \u00fcn\u00efc\u00f6d\u00e9 \u4e2d\u6587\n\tdef f(x): return {x}"
    va, vb = (getattr(getattr(t, "tok", None), "get_vocab", None) for t in (ta, tb))
    if ta.encode(probe) != tb.encode(probe) or (va and vb and len(va()) != len(vb())):
        raise ModelpressError(f"the baseline {base.source} has another tokenizer than {lm.source}; "
                              "flip rate and KL need the same one")


def _bos(lm: LoadedModel) -> int | None:
    return lm.tokenizer.bos_token_id if lm.add_bos else None


def _max_len(lm: LoadedModel) -> int:
    return lm.max_length or 2048


def _choice_run(lm: LoadedModel, task: Task, plan: EvalPlan, progress: Any) -> dict[str, Any]:
    from ..quant.qlinear import cached_dequant

    t0, c0 = time.perf_counter(), time.process_time()
    with cached_dequant():
        s = score_choices(lm.module, lm.tokenizer, task.items, max_len=_max_len(lm), bos=_bos(lm),
                          token_budget=plan.token_budget, progress=progress)
    items: Sequence[ChoiceItem] = task.items
    correct = [float(x.pred == it.label) for x, it in zip(s, items)]
    correct_norm = [float(x.pred_norm == it.label) for x, it in zip(s, items)]
    return {"pred": [x.pred for x in s], "pred_norm": [x.pred_norm for x in s],
            "metrics": {"acc": correct, "acc_norm": correct_norm},
            "eval_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}


def _generation_run(lm: LoadedModel, task: Task, plan: EvalPlan, progress: Any) -> dict[str, Any]:
    from ..quant.qlinear import cached_dequant

    t0, c0 = time.perf_counter(), time.process_time()
    with cached_dequant():
        res = score_generation(lm.module, lm.tokenizer, task.items, bos=_bos(lm), progress=progress)
    return {"outputs": [t for t, _ in res], "metrics": {"exact_match": [float(ok) for _, ok in res]},
            "eval_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}


def _run_task(lm: LoadedModel, task: Task, plan: EvalPlan, progress: Any) -> dict[str, Any]:
    return (_choice_run if task.kind is TaskKind.CHOICE else _generation_run)(lm, task, plan, progress)


def _item_tokens(lm: LoadedModel, task: Task) -> list[list[int]]:
    """Tokens of each item's whole text (context and choices, or prompt), for derived slices."""
    tok = lm.tokenizer
    if task.kind is TaskKind.CHOICE:
        return [tok.encode(" ".join([it.context, *it.choices]).strip()) for it in task.items]
    return [tok.encode(it.prompt) for it in task.items]


def _slices(lm: LoadedModel, task: Task, new: dict, base: dict | None, rare: tuple[Counter, int] | None) -> dict:
    families = {}
    labels = [it.slice for it in task.items]
    if any(lab is not None for lab in labels):
        families["data"] = labels
    families.update(derived_slices(_item_tokens(lm, task), *(rare or (None, 0))))
    return {fam: {m: slice_table(None if base is None else base["metrics"][m], v, labs)
                  for m, v in new["metrics"].items()} for fam, labs in families.items()}


def _task_entry(lm: LoadedModel, task: Task, new: dict, base: dict | None, rare: Any, plan: EvalPlan) -> dict:
    n = len(task.items)
    mean = {m: sum(v) / n for m, v in new["metrics"].items()}
    entry: dict[str, Any] = {"kind": task.kind.value, **mean, "n": n, "path": str(task.path),
                             "eval_s": new["eval_s"], "cpu_s": new["cpu_s"]}
    if base is not None:
        entry["baseline"] = {m: sum(v) / n for m, v in base["metrics"].items()}
        entry["baseline"].update(eval_s=base["eval_s"], cpu_s=base["cpu_s"])
        if task.kind is TaskKind.CHOICE:
            labels = [it.label for it in task.items]
            entry["flips"] = flips(base["pred"], new["pred"], labels)
            entry["flips_norm"] = flips(base["pred_norm"], new["pred_norm"], labels)
        else:
            entry["flips"] = flips(base["metrics"]["exact_match"], new["metrics"]["exact_match"], [1.0] * n)
            entry["outputs_changed"] = sum(a != b for a, b in zip(base["outputs"], new["outputs"])) / n
        entry["flip_rate"] = entry["flips"]["flip_rate"]
    if plan.slices:
        entry["slices"] = _slices(lm, task, new, base, rare)
    return entry


def rare_reference(lm: LoadedModel, spec: str) -> tuple[Counter, int]:
    """Token counts of the reference text (for the rare-token slices)."""
    from ..data.sources import read_text

    ids = lm.tokenizer.encode(read_text(spec, False))
    return Counter(ids), len(ids)


def evaluate_beyond_ppl(lm: LoadedModel, plan: EvalPlan, baseline: LoadedModel | None = None,
                        progress: Any = None) -> dict[str, Any]:
    """Tasks, agreement, behaviour and lm-eval results for ``lm`` (and against ``baseline``)."""
    if lm.tokenizer is None:
        raise ModelpressError(f"model {lm.source} has no tokenizer; task evaluation needs one")
    tasks, suite = read_plan_inputs(plan)
    out: dict[str, Any] = {}
    if baseline is not None:
        try:
            check_same_tokenizer(lm, baseline)
        except ModelpressError as e:
            if tasks or suite is not None or plan.lm_eval:
                raise
            return {"agreement": {"skipped": str(e)}}  # perplexity-only comparison: nothing else needs it
    if tasks:
        rare = rare_reference(lm, plan.rare_reference) if plan.slices else None
        out["tasks"] = {}
        for t in tasks:
            new = _run_task(lm, t, plan, progress)
            base = _run_task(baseline, t, plan, progress) if baseline is not None else None
            out["tasks"][t.name] = _task_entry(lm, t, new, base, rare, plan)
    if baseline is not None:
        out["agreement"] = agreement(lm, baseline, plan, progress)
    if suite is not None:
        out["behaviour"] = B.run_suite(lm.module, lm.tokenizer, suite, baseline=None if baseline is None else
                                       baseline.module, bos=_bos(lm), progress=progress)
    if plan.lm_eval:
        from .harness import run_lm_eval

        out["lm_eval"] = run_lm_eval(lm, plan.lm_eval, limit=plan.limit)
        if baseline is not None:
            out["lm_eval_baseline"] = run_lm_eval(baseline, plan.lm_eval, limit=plan.limit)
    return out


def agreement(lm: LoadedModel, baseline: LoadedModel, plan: EvalPlan, progress: Any = None) -> dict[str, Any]:
    """Next-token KL(baseline || model) and top-1 agreement on the plan's text."""
    from ..data.sources import read_text
    from ..quant.qlinear import cached_dequant

    ids = lm.tokenizer.encode(read_text(plan.agreement_text, plan.join_lines))[: plan.agreement_tokens]
    seq_len = plan.seq_len or min(2048, _max_len(lm))
    t0 = time.perf_counter()
    with cached_dequant():
        res = next_token_agreement(lm.module, baseline.module, ids, min(seq_len, len(ids)), bos_token_id=_bos(lm),
                                   progress=progress)
    res.update(text=str(plan.agreement_text), tokens=len(ids), eval_s=time.perf_counter() - t0,
               direction="KL(baseline || model), nats per position")
    return res


def _f(v: Any) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def markdown_lines(res: dict[str, Any]) -> list[str]:
    """Markdown for the tasks (with baseline and flips), flagged slices, agreement and behaviour."""
    lines: list[str] = []
    if res.get("tasks"):
        lines += ["## Tasks", "", "| task | n | metric | model | baseline | flip rate |", "|---|---|---|---|---|---|"]
        for name, t in res["tasks"].items():
            for m in ("acc", "acc_norm", "exact_match"):
                if m in t:
                    lines.append(f"| {name} | {t['n']} | {m} | {_f(t[m])} | {_f(t.get('baseline', {}).get(m))} | "
                                 f"{_f(((t.get('flips_norm') if m == 'acc_norm' else t.get('flips')) or {}).get('flip_rate'))} |")
        lines += [""] + _flagged_lines(res["tasks"])
    if res.get("agreement", {}).get("kl") is not None:
        a = res["agreement"]
        lines += ["## Agreement with the baseline", "", f"{a['direction']}: {_f(a['kl'])}; top-1 agreement "
                  f"{_f(a['top1_agreement'])} over {a['positions']} positions of {a['text']}", ""]
    if res.get("behaviour"):
        lines += B.markdown(res["behaviour"])
    return lines


def _flagged_lines(tasks: dict[str, Any]) -> list[str]:
    out = []
    for name, t in tasks.items():
        for fam, per_metric in t.get("slices", {}).items():
            for m, table in per_metric.items():
                out += [f"- {name} / {fam} / {m}: slice `{s}` {_f(table['slices'][s]['delta'])} vs "
                        f"{_f(table['overall']['delta'])} overall" for s in table["flagged"]]
    return (["Slices flagged (far worse than the whole):", ""] + out + [""]) if out else []
