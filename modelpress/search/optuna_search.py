"""Multi-objective search over recipe parameters with Optuna's NSGA-II, one real compression per trial.

The study lives in an Optuna storage (a SQLite file, or any database URL that SQLAlchemy opens), so:

  * **parallel**: several processes (on one machine, or many with a database server) run
    :func:`run_search` on the same storage and study name; each asks the storage for the next
    trial, and NSGA-II breeds from every finished trial whoever ran it;
  * **resumable**: rerunning the same command continues the study. It stops when the study holds
    ``trials`` complete trials (those already there included), so a finished study reruns nothing;
  * **killed trials**: every running trial writes a heartbeat; a trial whose process died (no
    heartbeat for ``2 x heartbeat`` seconds) is marked FAIL by the next worker and its parameters
    are queued again (at most twice), so the work lost is that one trial. A trial whose recipe
    cannot run (a :class:`ModelpressError`) is marked FAIL with the reason and not retried;
  * **no duplicated work**: a trial whose parameters equal a completed trial's takes its measured
    values (``reused_from``) instead of compressing again; if the earlier trial is still running in
    another worker, the later one waits for it. A reused trial does not count towards ``trials``.

With several workers the stop test (``complete + running < trials``) and the next ask are not one
transaction, so a study can end a trial or two past ``trials``; one worker ends exactly there.

The Pareto front (perplexity, size, latency: all minimised) of the complete trials is written with
every trial to ``OUT/search.json`` and ``OUT/search.md``; each trial's compress report and
evaluation are in ``OUT/trials/NNNN/``.

Example:
    >>> cfg = SearchConfig(space=read_space("space.yaml"), evaluation=EvalSettings(model="m"), trials=20,
    ...                    storage="sqlite:///study.db", study="smol", out=Path("search-out"))  # doctest: +SKIP
    >>> run_search(cfg)["pareto"]                                                            # doctest: +SKIP
"""
from __future__ import annotations

import json
import os
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..core.errors import ModelpressError
from .objectives import OBJECTIVES, EvalSettings, TrialEvaluator
from .pareto import nondominated
from .space import SearchSpace

#: Marks a results file as a search's, for ``modelpress report``.
KIND = "modelpress-search"
#: Proposals in a row of an already measured recipe after which a worker deems the space exhausted.
MAX_REUSED = 25
#: Tries at opening a storage whose tables another worker is creating at the same moment.
STORAGE_ATTEMPTS = 5


@dataclass(frozen=True)
class SearchConfig:
    """One search: the space, how trials are measured, and where the study is kept."""

    space: SearchSpace
    evaluation: EvalSettings
    trials: int
    storage: str
    study: str
    out: Path
    seed: int | None = None  # None: a fresh draw per worker (parallel workers must differ); int: reproducible
    population: int | None = None
    heartbeat_s: int = 30
    max_failures: int = 5

    def identity(self) -> dict[str, Any]:
        """What must match for a rerun to continue a study (not the trial count or the output folder)."""
        ev = {k: v for k, v in self.evaluation.to_dict().items() if k != "keep_models"}
        return {"space": self.space.to_dict(), "evaluation": ev, "objectives": list(OBJECTIVES)}


def safe_url(url: str) -> str:
    """The storage URL with any password hidden (it goes into messages and result files)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001  -- not a URL at all: nothing to hide
        return url


def open_storage(url: str, heartbeat_s: int = 30) -> Any:
    """An Optuna RDB storage with heartbeats, or a ModelpressError naming the URL and the cause."""
    try:
        import optuna
    except ImportError:
        raise ModelpressError("modelpress search needs optuna: pip install 'modelpress[search]'") from None
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    if url.startswith("sqlite:///") and not url.startswith("sqlite:////:memory:"):
        folder = Path(url.removeprefix("sqlite:///")).parent
        if not folder.is_dir():  # SQLite would say only "unable to open database file"
            raise ModelpressError(f"cannot open search storage {url}: folder {folder} does not exist")
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial is reported by our own line
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats: noise to users
    cause = ""
    for attempt in range(1, STORAGE_ATTEMPTS + 1):
        try:
            return _storage_class()(url, engine_kwargs=engine, heartbeat_interval=heartbeat_s,
                                    grace_period=2 * heartbeat_s,
                                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2))
        except Exception as e:  # noqa: BLE001  -- SQLAlchemy and drivers raise many types; all mean "cannot open"
            cause = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            # two workers creating a fresh database's tables at once: the loser retries and finds them
            if not any(k in cause for k in ("UNIQUE constraint", "locked", "already exists")):
                break
            time.sleep(0.5 * attempt)
    raise ModelpressError(f"cannot open search storage {safe_url(url)}: {cause}")


def _storage_class() -> type:
    """Optuna's RDB storage, except that a running trial that never wrote a heartbeat also goes stale.

    Optuna creates a trial (state RUNNING) before its heartbeat thread writes the first beat, and
    counts a running trial without any beat as alive for ever. A worker killed in that window would
    leave a trial that blocks the study's last slot (``complete + running >= trials``) and any later
    trial with the same parameters (which waits for its running twin): the resumed search would hang.
    Such a trial is stale once it has been running for the grace period with no beat."""
    import datetime

    from optuna.storages import RDBStorage
    from optuna.storages._rdb import models  # optuna's own table classes: a private module
    from optuna.storages._rdb.storage import _create_scoped_session
    from optuna.trial import TrialState
    from sqlalchemy import orm

    class Storage(RDBStorage):
        def _get_stale_trial_ids(self, study_id: int) -> list[int]:
            stale = list(super()._get_stale_trial_ids(study_id))
            grace = datetime.timedelta(seconds=self.grace_period or 2 * (self.heartbeat_interval or 0))
            now = datetime.datetime.now()  # optuna stamps datetime_start with the local clock, not the database's
            with _create_scoped_session(self.scoped_session, True) as session:
                running = (session.query(models.TrialModel)
                           .options(orm.selectinload(models.TrialModel.heartbeats))
                           .filter(models.TrialModel.state == TrialState.RUNNING)
                           .filter(models.TrialModel.study_id == study_id).all())
                for t in running:
                    if not t.heartbeats and t.datetime_start is not None and now - t.datetime_start > grace:
                        stale.append(t.trial_id)
            return stale

    return Storage


def open_study(cfg: SearchConfig) -> Any:
    """Create the study, or load it to continue; refuses a study created for another space or model."""
    import optuna

    storage = open_storage(cfg.storage, cfg.heartbeat_s)
    study = optuna.create_study(storage=storage, study_name=cfg.study, directions=["minimize"] * len(OBJECTIVES),
                                load_if_exists=True)
    ident = json.loads(json.dumps(cfg.identity(), default=str))
    held = study.user_attrs.get("identity")
    if held is None:
        study.set_user_attr("identity", ident)
    elif held != ident:
        diff = sorted(k for k in ident if held.get(k) != ident[k])
        raise ModelpressError(f"study {cfg.study!r} in {safe_url(cfg.storage)} was created with another "
                              f"{' and '.join(diff)}; pass another --study name to start a new one")
    # Seeded by how far the study is, so a resumed worker does not replay the draws already made.
    seed = None if cfg.seed is None else cfg.seed + len(study.trials)
    pop = cfg.population or max(4, min(50, cfg.trials // 3))
    study.sampler = optuna.samplers.NSGAIISampler(population_size=pop, seed=seed)
    return study


def _counts(study: Any) -> Counter:
    """Trials by state; a complete trial that reused another's numbers counts as REUSED, not COMPLETE."""
    _fail_stale(study)
    return Counter("REUSED" if "reused_from" in t.user_attrs else t.state.name for t in study.get_trials(deepcopy=False))


def _fail_stale(study: Any) -> None:
    """Dead workers' trials -> FAIL, and their parameters queued again."""
    from optuna.storages import fail_stale_trials

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=_experimental())
        fail_stale_trials(study)


def _experimental() -> type[Warning]:
    from optuna.exceptions import ExperimentalWarning

    return ExperimentalWarning


def _objective(cfg: SearchConfig, evaluator: Callable[[], TrialEvaluator],
               ran: list[int]) -> Callable[[Any], tuple[float, ...]]:
    def objective(trial: Any) -> tuple[float, ...]:
        ran.append(trial.number)
        params = cfg.space.suggest(trial)
        done = _measured_twin(trial, min(cfg.heartbeat_s, 2))
        if done is not None:  # the same recipe was measured: take its numbers, do not compress again
            for k, v in done.user_attrs.items():
                trial.set_user_attr(k, v)
            trial.set_user_attr("reused_from", done.number)
            return tuple(done.values)
        recipe = cfg.space.recipe(params)
        trial.set_user_attr("recipe", recipe.to_dict())
        try:
            res = evaluator().evaluate(recipe, trial_folder(cfg.out, trial.number))
        except ModelpressError as e:
            trial.set_user_attr("error", str(e))
            raise
        trial.set_user_attr("measures", res["measures"])
        trial.set_user_attr("folder", str(trial_folder(cfg.out, trial.number).relative_to(cfg.out)))
        return tuple(float(res["objectives"][k]) for k in OBJECTIVES)

    return objective


def _measured_twin(trial: Any, poll_s: float) -> Any:
    """A complete trial with this trial's parameters, or None. An earlier trial with the same
    parameters that another worker is still running is waited for (only by later trials, so two
    workers never wait on each other), so parallel workers do not measure one recipe twice."""
    while True:
        same = [t for t in trial.study.get_trials(deepcopy=False) if t.number != trial.number and t.params == trial.params]
        done = next((t for t in same if t.state.name == "COMPLETE"), None)
        if done is not None or not any(t.state.name == "RUNNING" and t.number < trial.number for t in same):
            return done
        time.sleep(poll_s)
        _fail_stale(trial.study)  # a twin whose worker died is never going to end: fail it, do not wait for ever


def trial_folder(out: Path, number: int) -> Path:
    """Where trial ``number`` keeps its compress report and evaluation."""
    return out / "trials" / f"{number:04d}"


def run_search(cfg: SearchConfig, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Run trials until the study holds ``cfg.trials`` complete ones, then write the results."""
    if cfg.trials < 1:
        raise ModelpressError(f"--trials must be >= 1, got {cfg.trials}")
    study = open_study(cfg)
    cfg.out.mkdir(parents=True, exist_ok=True)
    holder: list[TrialEvaluator] = []  # the model loads on the first trial this worker runs, not before

    def evaluator() -> TrialEvaluator:
        if not holder:
            holder.append(TrialEvaluator(cfg.evaluation))
        return holder[0]

    ran: list[int] = []  # numbers of the trials this worker ran
    objective, failures, reused = _objective(cfg, evaluator, ran), 0, 0
    while True:
        n = _counts(study)
        if n["COMPLETE"] >= cfg.trials:
            break
        if n["COMPLETE"] + n["RUNNING"] >= cfg.trials:
            time.sleep(min(cfg.heartbeat_s, 5))  # others hold the last trials: wait until they end or go stale
            continue
        if not _optimize_one(study, objective, ran, log):
            continue
        t = study.trials[ran[-1]] if ran else None
        log(_trial_line(t))
        failures = failures + 1 if t is not None and t.state.name == "FAIL" else 0
        reused = reused + 1 if t is not None and "reused_from" in t.user_attrs else 0
        if reused >= MAX_REUSED:
            log(f"the sampler proposed {reused} measured recipes in a row: the space looks exhausted, stopping")
            break
        if failures >= cfg.max_failures:
            raise ModelpressError(f"{failures} trials in a row failed (last: {t.user_attrs.get('error')}); "
                                  "fix the space or the data and rerun to continue the study")
    return write_results(study, cfg)


def _optimize_one(study: Any, objective: Callable[[Any], tuple[float, ...]], ran: list[int],
                  log: Callable[[str], None]) -> bool:
    """Run one trial; False when another worker had already failed it as stale (this worker's
    heartbeats came too late, e.g. on an overloaded machine) and queued its parameters again."""
    try:
        study.optimize(objective, n_trials=1, catch=(ModelpressError,))
    except Exception:  # optuna raises ValueError or trips an assert when telling a trial failed meanwhile
        number = ran[-1] if ran else None
        if number is None or not any(t.system_attrs.get("failed_trial") == number for t in study.get_trials(deepcopy=False)):
            raise
        log(f"trial {number} was failed by another worker while it ran (its heartbeats came too late); retried")
        return False
    return True


def _trial_line(t: Any) -> str:
    if t is None:
        return ""
    if t.state.name != "COMPLETE":
        return f"trial {t.number}: {t.state.name.lower()} {t.params} {t.user_attrs.get('error', '')}"
    ppl, size, lat = t.values
    again = f" (the numbers of trial {t.user_attrs['reused_from']}: same recipe)" if "reused_from" in t.user_attrs else ""
    return f"trial {t.number}: {t.params} -> perplexity {ppl:.3f}, {size / 2**20:.2f} MiB, {lat:.2f} ms/token{again}"


def trial_records(study: Any) -> list[dict[str, Any]]:
    """Every trial as plain data (state, parameters, objectives, measures)."""
    out = []
    for t in study.get_trials(deepcopy=False):
        params = {k: round(v, 12) if isinstance(v, float) else v for k, v in t.params.items()}  # 0.30000000000000004
        rec = {"number": t.number, "state": t.state.name, "params": params,
               "objectives": dict(zip(OBJECTIVES, t.values)) if t.values else None,
               "duration_s": t.duration.total_seconds() if t.duration else None}
        rec.update(t.user_attrs)
        retried = t.system_attrs.get("failed_trial")
        if retried is not None:
            rec["retry_of"] = retried
        out.append(rec)
    return out


def pareto_numbers(records: list[dict[str, Any]]) -> list[int]:
    """Trial numbers on the Pareto front of the measured trials (every objective minimised); a trial
    that reused another's numbers is that trial, not a second point."""
    done = [r for r in records if r["state"] == "COMPLETE" and "reused_from" not in r]
    points = [tuple(r["objectives"][k] for k in OBJECTIVES) for r in done]
    return [done[i]["number"] for i in nondominated(points)]


def write_results(study: Any, cfg: SearchConfig) -> dict[str, Any]:
    """``OUT/search.json`` (every trial, the front) and ``OUT/search.md`` (the front as a table)."""
    records = trial_records(study)
    res = {"kind": KIND, "study": cfg.study, "storage": safe_url(cfg.storage), "objectives": list(OBJECTIVES),
           "directions": ["minimize"] * len(OBJECTIVES), "trials_requested": cfg.trials,
           "counts": dict(Counter("REUSED" if "reused_from" in r else r["state"] for r in records)), "identity": cfg.identity(),
           "pareto": pareto_numbers(records), "trials": records}
    _atomic_write(cfg.out / "search.json", json.dumps(res, indent=1, default=str))
    _atomic_write(cfg.out / "search.md", "\n".join(markdown(res)) + "\n")
    return res


def markdown(res: dict[str, Any]) -> list[str]:
    """The Pareto front as a Markdown table, best perplexity first."""
    by_number = {r["number"]: r for r in res["trials"]}
    front = sorted((by_number[n] for n in res["pareto"]), key=lambda r: r["objectives"]["perplexity"])
    names = list(front[0]["params"]) if front else []
    lines = [f"# Search {res['study']}: Pareto front", "",
             f"{len(front)} of {res['counts'].get('COMPLETE', 0)} measured trials are on the front of perplexity, "
             f"size on disk and decode latency (all minimised); storage {res['storage']}.", "",
             "| trial | " + " | ".join(names) + " | perplexity | size MiB | ms/token | bits/weight |",
             "|---" * (len(names) + 5) + "|"]
    for r in front:
        o, m = r["objectives"], r.get("measures") or {}
        bits = m.get("bits_per_weight")
        lines.append(f"| {r['number']} | " + " | ".join(str(r["params"][k]) for k in names) +
                     f" | {o['perplexity']:.3f} | {o['size_bytes'] / 2**20:.2f} | {o['latency_ms']:.2f} | "
                     f"{'-' if bits is None else f'{bits:.2f}'} |")
    return lines


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, path)
