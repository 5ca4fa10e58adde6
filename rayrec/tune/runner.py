"""The `rayrec tune` recipe: check -> data -> tracking -> Tuner -> fit -> best config -> report.

Everything that can fail cheaply (space file, base job, storage, MLflow, whether a trial
fits the cluster) fails before the first trial starts. Each trial is a full Ray Train
run (see ``rayrec.tune.trial``) of a sequential-model or a generative job
(``rayrec.config.kinds``); Optuna proposes the values, ASHA stops weak trials at its
rungs, and every trial is a child run of the sweep's MLflow parent run.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from pydantic import BaseModel

from rayrec.cluster import DATA_CPU_RESERVE, shared_paths
from rayrec.config.kinds import GENREC
from rayrec.config.loader import dump_job
from rayrec.errors import ConfigError, RayrecError
from rayrec.runs import check_storage
from rayrec.storage import ObjectFolder, local_home, storage_value
from rayrec.tracking.mlflow_tracking import Tracker, check_reachable, resolve_uri
from rayrec.tune.space import OptunaSpace, Sweep

log = logging.getLogger(__name__)

COMPLETE_MARKER = ".rayrec_sweep_complete"
BEST_JOB, RESULTS_CSV, SUMMARY_CSV = "best.yaml", "results.csv", "summary.csv"


@dataclass
class TrialRow:
    """One line of the summary: a trial's status, epochs run, searched values and best metric."""

    trial_id: str
    status: str
    epochs: int
    params: dict[str, Any]
    value: float | None
    checkpoint: str | None = None
    trained: int = 0  # epochs the trial trained (its epoch reports): what the epoch budget counts


@dataclass(frozen=True)
class SweepPlace:
    """Where a sweep lives: ``tune``, Tune's folder of it (its state, the trials' results and runs: a folder
    or an object-store URI), and ``dir``, the folder this machine writes the console log, the summary CSVs
    and the best job into (the same folder, or on object storage this machine's folder of it)."""

    tune: str
    dir: Path
    store: ObjectFolder | None = None


@dataclass
class SweepOutcome:
    sweep_dir: Path
    rows: list[TrialRow]
    best: TrialRow | None
    best_job: Path | None
    best_test: dict[str, float] = field(default_factory=dict)
    parent_run_id: str | None = None
    interrupted: bool = False
    log_path: Path | None = None
    store: str | None = None  # on object storage: the sweep's URI (Tune's state, the trials' runs)


def run_sweep(sweep: Sweep, *, resume: bool = False, export: Path | None = None,
              verbose: bool = False) -> SweepOutcome:
    """Run (or, with ``resume``, continue) the sweep described by ``sweep``.

    The console shows one line per trial epoch and the summary; Ray's and the trials' own
    output goes to ``rayrec.log`` in the sweep folder (``verbose``: to the console too).
    """
    from rayrec.cluster import ensure_ray
    from rayrec.console import job_console

    # 1. cheap checks first: storage, sweep folder, MLflow
    job = absolute_paths(shared_paths(sweep.job))  # on a cluster: data on its shared storage
    storage = check_storage(sweep.space.storage_path)
    if isinstance(storage, ObjectFolder):
        from rayrec.recipes import recipe_for

        if not recipe_for(job).object_storage:
            raise ConfigError(f"storage_path {storage.uri}: the trials of a {sweep.kind.name} sweep write their "
                              "checkpoints as local files; give the sweep a folder (a shared one on a cluster)")
    place = pick_sweep_dir(storage, sweep.name, resume)
    sweep_dir = place.dir
    uri = resolve_uri(job.tracking.uri) if job.tracking.enabled else None
    if uri:
        check_reachable(uri)
    with job_console(sweep_dir, [], verbose=verbose) as console:
        # 2. Ray with the dashboard: its state API lets Train clean up after ASHA stops a trial;
        #    then what every trial reads (data, features, SID index), made once here
        ensure_ray()
        console.attach_ray()
        shared = prepare_shared(sweep, job)
        logging.getLogger("tensorboardX").setLevel(logging.WARNING)  # it renames every metric with '@'
        concurrency = fit_concurrency(sweep)
        parent = _open_parent(sweep, job, uri, place.tune, resume)
        plan = _plan(sweep, job, place.tune, uri, parent.run_id)
        plan.shared = shared
        # 3. tune: a new Tuner, or the saved one (finished trials are kept, unfinished ones continue)
        tuner = _tuner(sweep, plan, place, concurrency, resume, verbose)
        start = time.monotonic()
        try:
            grid = tuner.fit()  # Ctrl-C: Tune saves the sweep and returns; --resume continues it
        except BaseException:
            parent.finish("KILLED")
            raise
        # 4. report: summary, CSVs, the best trial as a runnable job, the parent run's records
        budget = sweep.space.time_budget_s
        out_of_time = bool(budget) and time.monotonic() - start >= 0.95 * budget
        out = _report(sweep, plan, grid, place, parent, export, out_of_time)
    out.log_path = console.log_path
    return out


def absolute_paths(cfg: BaseModel) -> Any:
    """A copy of ``cfg`` whose relative paths are absolute: trials run in their own folders.

    Besides path fields, a generative job's ``model.base`` and ``train.deepspeed`` become
    absolute when they name a local folder or file (they may also be a hub id or a name).
    """
    cfg = cfg.model_copy(deep=True)
    _absolutize(cfg)
    if isinstance(cfg, GENREC.schema):
        for section, name in ((cfg.model, "base"), (cfg.train, "deepspeed")):
            value = getattr(section, name)
            if value and Path(value).expanduser().exists():
                setattr(section, name, str(Path(value).expanduser().resolve()))
    return cfg


def _absolutize(model: BaseModel) -> None:
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, Path) and not value.is_absolute():
            setattr(model, name, value.expanduser().resolve())
        elif isinstance(value, BaseModel):
            _absolutize(value)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, BaseModel):
                    _absolutize(item)


def prepare_shared(sweep: Sweep, job: BaseModel) -> Any:
    """What every trial reads, made once before any starts (the recipe's ``share``: the prepared
    dataset and its row tables in the object store; a joint job's features; a generative job's
    semantic-ID index). Returns what the trials get (``TrialPlan.shared``)."""
    from rayrec.recipes import recipe_for

    return recipe_for(job).share(job)


def pick_sweep_dir(storage: Path | ObjectFolder, name: str, resume: bool) -> SweepPlace:
    """``storage/name`` for a new sweep (``name_vN`` once it completed); the saved one to resume."""
    from ray.tune import Tuner

    def place(n: str) -> SweepPlace:
        if isinstance(storage, ObjectFolder):
            store = storage.child(n)
            return SweepPlace(store.uri, local_home(store.uri), store)
        return SweepPlace(str(storage / n), storage / n)

    path = place(name)
    if resume:
        if not Tuner.can_restore(path.tune):
            raise RayrecError(f"--resume: no saved sweep at {path.tune}; run without --resume to start it")
        return path
    n = 1
    while is_complete(path):
        n += 1
        path = place(f"{name}_v{n}")
    if Tuner.can_restore(path.tune):
        raise RayrecError(f"an interrupted sweep is saved at {path.tune}; continue it with --resume, or start a "
                          f"new one under another name (override name={name}_new)")
    return path


def is_complete(place: SweepPlace) -> bool:
    if place.store is not None:
        return place.store.exists(COMPLETE_MARKER)
    return (place.dir / COMPLETE_MARKER).exists()


def fit_concurrency(sweep: Sweep) -> int:
    """Trials that can run at once, leaving CPUs for Ray Data; fail if not even one fits."""
    import ray

    t, total = sweep.space.trial, ray.cluster_resources()
    cpu = t.driver_cpu + t.num_workers * float(t.resources_per_worker.get("CPU", 0.0 if t.use_gpu else 1.0))
    free = float(total.get("CPU", 0.0)) - DATA_CPU_RESERVE
    limits = [math.floor(free / cpu + 1e-9) if cpu > 0 else sweep.space.max_concurrent_trials]
    if t.use_gpu:
        gpu = t.num_workers * float(t.resources_per_worker.get("GPU", 1.0))
        limits.append(math.floor(float(total.get("GPU", 0.0)) / gpu + 1e-9))
    custom: dict[str, float] = dict(t.driver_resources)
    for k, v in t.resources_per_worker.items():
        if k not in ("CPU", "GPU"):
            custom[k] = custom.get(k, 0.0) + t.num_workers * v
    for k, need in custom.items():
        if need > 0:
            if float(total.get(k, 0.0)) < need:
                raise RayrecError(f"one trial needs {need:g} of the resource {k!r} (trial.driver_resources / "
                                  f"resources_per_worker), but the cluster has {total.get(k, 0):g}: start nodes with "
                                  f"--resources '{{\"{k}\": N}}', or drop it from the space file")
            limits.append(math.floor(float(total[k]) / need + 1e-9))
    fits = min(limits)
    if fits < 1:
        raise RayrecError(
            f"one trial needs {cpu:g} CPUs (driver {t.driver_cpu:g} + {t.num_workers} workers x "
            f"{t.resources_per_worker.get('CPU', 1.0):g})" + (f" and {gpu:g} GPUs" if t.use_gpu else "")
            + f", but the cluster has {total.get('CPU', 0):g} CPUs ({DATA_CPU_RESERVE:g} kept for Ray Data)"
            + (f" and {total.get('GPU', 0):g} GPUs" if t.use_gpu else "")
            + "; lower trial.resources_per_worker / trial.num_workers in the space file")
    if fits < sweep.space.max_concurrent_trials:
        log.warning("max_concurrent_trials=%d does not fit (each trial takes %g CPUs of %g, %g kept for Ray Data); "
                    "running %d at a time", sweep.space.max_concurrent_trials, cpu, total.get("CPU", 0),
                    DATA_CPU_RESERVE, fits)
    return min(fits, sweep.space.max_concurrent_trials)


def _open_parent(sweep: Sweep, job: BaseModel, uri: str | None, sweep_dir: str, resume: bool) -> Tracker:
    from rayrec.tune.mlflow_sweep import BASE_JOB_TAG, open_parent

    if not uri:
        return Tracker.null()
    parent = open_parent(uri, job.tracking.experiment, sweep_dir, sweep.name, resume=resume,
                         tags={"rayrec.space_file": str(sweep.source.resolve()), BASE_JOB_TAG: str(sweep.job_source)})
    s = sweep.space
    parent.log_params({"sweep.metric": s.metric, "sweep.mode": s.resolved_mode, "sweep.num_samples": s.num_samples,
                       "sweep.searcher": s.searcher.name, "sweep.seed": s.searcher.seed, "sweep.scheduler": s.scheduler.name,
                       "sweep.grace_period": s.scheduler.grace_period, "sweep.reduction_factor": s.scheduler.reduction_factor,
                       "sweep.max_epochs": sweep.max_epochs, "sweep.max_concurrent_trials": s.max_concurrent_trials,
                       "sweep.time_budget_s": s.time_budget_s, "sweep.params": ", ".join(s.params),
                       "sweep.job_kind": sweep.kind.name})
    parent.log_text(yaml.safe_dump(s.model_dump(mode="json"), sort_keys=False), "sweep/space.yaml")
    parent.log_text(dump_job(job), "sweep/base_job.yaml")
    return parent


def _plan(sweep: Sweep, job: BaseModel, sweep_dir: str, uri: str | None, parent_id: str | None):
    from rayrec.tune.space import reports_clock, trial_base
    from rayrec.tune.trial import TrialPlan

    t = sweep.space.trial
    return TrialPlan(
        sweep=sweep.name, sweep_dir=sweep_dir, base=trial_base(job), job_source=str(sweep.job_source),
        metric=sweep.space.metric, mode=sweep.space.resolved_mode,
        epochs=(None if reports_clock(job) or sweep.max_epochs == job.train.epochs  # (ur4rec: the stages' sum)
                else sweep.max_epochs),
        scaling={"num_workers": t.num_workers, "use_gpu": t.use_gpu, "resources_per_worker": dict(t.resources_per_worker)},
        tracking_uri=uri, parent_run_id=parent_id, searched=list(sweep.order), kind=sweep.kind.name,
    )


def _tuner(sweep: Sweep, plan, place: SweepPlace, concurrency: int, resume: bool, verbose: bool = False):
    """A ``Tuner`` over the trial function: Optuna search, ASHA on the epoch clock, MLflow callback."""
    from ray import tune

    from rayrec.tune.trial import run_trial

    t = sweep.space.trial
    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan),
                                    {"CPU": t.driver_cpu, **t.driver_resources})
    if resume:  # Tune restores the run config, the epoch budget's stopper (and its count) included
        return tune.Tuner.restore(place.tune, trainable=trainable, resume_unfinished=True, resume_errored=False)
    from rayrec.tune.budget import EpochBudget

    s = sweep.space
    stop = EpochBudget(s.epoch_budget, record=place.dir) if s.epoch_budget else None
    tune_config = tune.TuneConfig(
        metric=_objective(sweep), mode=s.resolved_mode, search_alg=make_searcher(sweep), scheduler=make_scheduler(sweep),
        num_samples=s.num_samples, max_concurrent_trials=concurrency, time_budget_s=s.time_budget_s,
        trial_dirname_creator=_trial_dirname(), trial_name_creator=_trial_dirname(),
    )
    parent, _, name = place.tune.rpartition("/")  # a URI as a string: each process resolves the store itself
    run_config = tune.RunConfig(
        name=name, storage_path=parent, callbacks=[_recorder(sweep, plan)], stop=stop,
        failure_config=tune.FailureConfig(max_failures=t.max_failures, fail_fast=False),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        verbose=None if verbose else 0,  # rayrec's recorder prints one line per trial epoch
    )
    return tune.Tuner(trainable, param_space={}, tune_config=tune_config, run_config=run_config)


def _objective(sweep: Sweep) -> str:
    from rayrec.tune.reports import objective_key

    return objective_key(sweep.space.metric)


def _trial_dirname():
    from rayrec.tune.trial import trial_dirname

    return trial_dirname


def _recorder(sweep: Sweep, plan):
    from rayrec.tune.mlflow_sweep import TrialRecorder

    return TrialRecorder(plan.tracking_uri, plan.base["tracking"]["experiment"], plan.parent_run_id, sweep.name,
                         sweep.space.metric, _objective(sweep), sweep.space.time_budget_s, plan.job_source)


def make_searcher(sweep: Sweep):
    """``OptunaSearch`` over the define-by-run space: TPE (seeded) or Optuna's random sampler."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    s = sweep.space.searcher
    if s.name == "random":
        sampler = optuna.samplers.RandomSampler(seed=s.seed)
    else:  # TPE models the results after random startup trials: half of a small sweep, at most Optuna's 10
        startup = max(2, min(10, sweep.space.num_samples // 2))
        sampler = optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=startup)
    return OptunaSearch(space=OptunaSpace(sweep.space.params, sweep.order), metric=_objective(sweep),
                        mode=sweep.space.resolved_mode, sampler=sampler,
                        points_to_evaluate=[dict(p) for p in s.points_to_evaluate] or None)


def make_scheduler(sweep: Sweep):
    """ASHA on the epoch clock, with every rung below the last epoch.

    A trial that reaches its last epoch must not be stopped there: it still has to
    report its test metrics. So ``max_t`` is one below the trial's epochs and
    ``stop_last_trials`` is off; trials that pass every rung simply run to the end.
    """
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from rayrec.tune.reports import TIME_ATTR

    sch = sweep.space.scheduler
    if sch.name == "none":
        return FIFOScheduler()
    return ASHAScheduler(time_attr=TIME_ATTR, max_t=max(sch.grace_period, sweep.max_epochs - 1),
                         grace_period=sch.grace_period, reduction_factor=sch.reduction_factor, stop_last_trials=False)


def asha_rungs(grace: int, reduction_factor: float, max_epochs: int) -> list[float]:
    """The epochs at which ASHA compares trials (as ``make_scheduler`` sets it up)."""
    max_t = max(grace, max_epochs - 1)
    n = int(math.log(max_t / grace) / math.log(reduction_factor) + 1)
    return [grace * reduction_factor**k for k in range(n)]


# --- the end of a sweep -----------------------------------------------------------------------


def _report(sweep: Sweep, plan, grid, place: SweepPlace, parent: Tracker, export: Path | None,
            out_of_time: bool) -> SweepOutcome:
    """Summary, CSVs, the best job and the parent run's records."""
    from rayrec.tune.reports import is_test_report

    sweep_dir = place.dir
    sweep_dir.mkdir(parents=True, exist_ok=True)
    statuses = saved_statuses(place.tune)
    rows = trial_rows(sweep, grid, statuses)
    from rayrec.tune.budget import recorded_spent

    epochs = sweep.space.epoch_budget
    counted = max(sum(r.trained for r in rows), recorded_spent(sweep_dir) or 0)  # the stopper's count after a resume
    spent = bool(epochs) and counted >= epochs
    ended_by = "time budget" if out_of_time else "epoch budget" if spent else None  # fewer trials: no interruption
    unfinished = any(s not in ("TERMINATED", "ERROR") for s in statuses.values())
    interrupted = unfinished or (len(statuses) < sweep.space.num_samples and not ended_by)
    grid.get_dataframe().to_csv(sweep_dir / RESULTS_CSV, index=False)
    summary_frame(rows, sweep).to_csv(sweep_dir / SUMMARY_CSV, index=False)
    best = best_row(rows, sweep.space.resolved_mode)
    best_job = best_test = None
    if best is not None:
        best_job = write_best_job(sweep, plan, best, sweep_dir / BEST_JOB)
        result = next((r for r in grid if r.metrics and r.metrics.get("trial_id") == best.trial_id), None)
        metrics = result.metrics if result is not None else {}
        best_test = {k: v for k, v in metrics.items() if k.startswith("test/")} if is_test_report(metrics) else {}
        if export:
            export.parent.mkdir(parents=True, exist_ok=True)
            export.write_text(best_job.read_text())
    if not interrupted and parent.active and ended_by:  # trials Tune stopped at the budget, without a callback
        from rayrec.tune.mlflow_sweep import close_open_children

        closed = close_open_children(parent.uri, sweep.job.tracking.experiment, parent.run_id, ended_by)
        if closed:
            log.info("the %s stopped trials %s; their runs are recorded as stopped early", ended_by, ", ".join(closed))
    _finish_parent(parent, sweep, rows, best, sweep_dir, interrupted)
    if place.store is not None:  # beside Tune's state: the summary, the best job, then the completion marker
        for name in (RESULTS_CSV, SUMMARY_CSV, BEST_JOB):
            if (sweep_dir / name).exists():
                place.store.write_text(name, (sweep_dir / name).read_text())
    if not interrupted:
        (sweep_dir / COMPLETE_MARKER).write_text(parent.run_id or "")
        if place.store is not None:
            place.store.write_text(COMPLETE_MARKER, parent.run_id or "")
    return SweepOutcome(sweep_dir, rows, best, best_job, best_test or {}, parent.run_id, interrupted,
                        store=place.store.uri if place.store is not None else None)


def saved_statuses(sweep_dir: Path | str) -> dict[str, str]:
    """Each trial's status as the sweep's saved state holds it (what ``--resume`` continues from).

    After Ctrl-C, Tune saves the state before it stops the running trials, so the saved
    state (RUNNING/PENDING) and not the in-memory one (TERMINATED) tells what is unfinished.
    """
    from ray.tune import ExperimentAnalysis

    quiet = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # trials that never reported have no results to load
    try:
        return {t.trial_id: t.status for t in ExperimentAnalysis(str(sweep_dir)).trials}
    finally:
        quiet.setLevel(level)


def trial_rows(sweep: Sweep, grid, statuses: dict[str, str]) -> list[TrialRow]:
    """One row per trial from Tune's results: status, epochs, searched values, best metric."""
    from rayrec.tune.budget import trial_epochs
    from rayrec.tune.mlflow_sweep import COMPLETED, FAILED, STOPPED
    from rayrec.tune.reports import CHECKPOINT_KEY, TIME_ATTR, is_final

    objective = _objective(sweep)
    trained = trial_epochs(grid)
    rows = []
    for trial_id, result in _results_by_trial(grid, statuses).items():
        m = (result.metrics if result is not None else None) or {}
        status = statuses.get(trial_id, "TERMINATED")
        if status == "ERROR" or (result is not None and result.error):
            label = FAILED
        elif status != "TERMINATED":
            label = status.lower()  # running / pending when the sweep was interrupted
        else:
            label = COMPLETED if is_final(m) else STOPPED
        config = (result.config if result is not None else None) or {}
        params = {k: config[k] for k in sweep.order if k in config}
        value = m.get(objective)
        rows.append(TrialRow(trial_id, label, int(m.get(TIME_ATTR, 0) or 0), params,
                             float(value) if value is not None else None, m.get(CHECKPOINT_KEY),
                             trained.get(trial_id, 0)))
    return rows


def _results_by_trial(grid, statuses: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for result in grid:
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name.removeprefix("trial_")
        out[trial_id] = result
    for trial_id in statuses:  # trials that never reported
        out.setdefault(trial_id, None)
    return out


def best_row(rows: list[TrialRow], mode: str) -> TrialRow | None:
    """The trial with the best validation value (never a test metric)."""
    scored = [r for r in rows if r.value is not None and math.isfinite(r.value)]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda r: r.value)


def summary_frame(rows: list[TrialRow], sweep: Sweep) -> pd.DataFrame:
    """The summary table: best first, one column per searched param."""
    mode = sweep.space.resolved_mode
    records = [{"trial": r.trial_id, "status": r.status, "epochs": r.epochs, **r.params,
                f"best {sweep.space.metric}": r.value} for r in rows]
    frame = pd.DataFrame.from_records(records)
    if frame.empty:
        return frame
    key = f"best {sweep.space.metric}"
    return frame.sort_values(key, ascending=mode == "min", na_position="last").reset_index(drop=True)


def write_best_job(sweep: Sweep, plan, best: TrialRow, path: Path) -> Path:
    """The best trial's config as a job file: `rayrec train best.yaml` (a generative job:
    `rayrec sft best.yaml`) re-runs that trial."""
    from rayrec.tune.trial import trial_job

    cfg = trial_job(plan, best.params, name=f"{sweep.name}_best")
    cfg.run.storage_path = storage_value(plan.base["run"]["storage_path"])
    values = "\n".join(f"#   {k}: {v!r}" for k, v in best.params.items())
    header = (f"# Best trial {best.trial_id} of sweep '{sweep.name}' ({sweep.source}):\n"
              f"# best {sweep.space.metric} = {best.value:.4f} after {best.epochs} epochs ({best.status}).\n"
              f"# Searched values:\n{values}\n"
              f"# Base job: {sweep.job_source}. Scaling is the trial's; raising scaling.num_workers\n"
              f"# speeds it up but changes the global batch size.\n# Run: {sweep.kind.command} {path}\n")
    path.write_text(header + dump_job(cfg))
    return path


def _finish_parent(parent: Tracker, sweep: Sweep, rows: list[TrialRow], best: TrialRow | None,
                   sweep_dir: Path, interrupted: bool) -> None:
    from rayrec.tune.mlflow_sweep import COMPLETED, FAILED, STOPPED, find_child

    if not parent.active:
        return
    counts = {s: sum(r.status == s for r in rows) for s in (COMPLETED, STOPPED, FAILED)}
    parent.log_metrics({f"trials/{k}": v for k, v in counts.items()}
                       | {"trials/epochs": sum(r.epochs for r in rows), "trials/trial_epochs": sum(r.trained for r in rows)})
    for name in (RESULTS_CSV, SUMMARY_CSV, BEST_JOB):
        if (sweep_dir / name).exists():
            parent.log_file(sweep_dir / name, "sweep")
    if best is not None:
        parent.log_metrics({f"best/{sweep.space.metric}": best.value})
        child = find_child(parent.uri, sweep.job.tracking.experiment, parent.run_id, best.trial_id)
        parent.set_tags({"rayrec.best_trial": best.trial_id, "rayrec.best_run_id": child or ""})
    parent.finish("KILLED" if interrupted else "FINISHED")
