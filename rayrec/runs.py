"""The one job driver: ``run_job(recipe, cfg)`` runs every kind of job.

The driver owns what every job needs, in this order:

1. shared storage paths (``$RAYREC_STORAGE_ROOT`` on a cluster) and the storage check;
2. the run folder (``storage/name``, or ``name_vN`` once that run completed; an unfinished
   one is reused, so a re-run after a crash resumes it) and the console with its log file;
3. Ray and the cluster preflight (unless the job runs in this process);
4. the recipe's driver-side preparation (dataset, features, SID index, prompts), before
   any worker starts;
5. MLflow: the run opened (or re-opened), params, resolved YAML, the recipe's inputs;
6. training: the recipe's local path, or one ``TorchTrainer`` built here from the recipe's
   worker loop (scaling, failure handling, start timeout, placement errors);
7. the finish: checkpoint tags, learning curves, status, the completion marker.

A *recipe* (``rayrec.recipes``) supplies only what differs between job kinds: its schema,
``prepare``, ``record``, its worker loop (``trainer``), its ``local`` path and how it reads
its ``outcome``. Sweep trials call ``run_job`` too, with their own MLflow child run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rayrec.config.loader import dump_job, flatten
from rayrec.console import job_console
from rayrec.data.atomic import atomic_write, clear_stale_temporaries
from rayrec.errors import ConfigError, RayrecError
from rayrec.run_lock import hold_run
from rayrec.stopping import Stopped, as_stopped, on_signals
from rayrec.storage import ObjectFolder, is_object_uri, local_home, open_folder
from rayrec.tracking.mlflow_tracking import NOT_LOGGED, Tracker, check_reachable, open_run, resolve_uri

log = logging.getLogger(__name__)

COMPLETE_MARKER = ".rayrec_complete"
BEST_CHECKPOINT = "best_checkpoint.txt"  # the finished run's checkpoint (an SFT run: its best adapter)
FINAL_METRICS = "final_metrics.json"  # the finished run's final metrics and checkpoint (what a sweep reads again)
CHECKPOINT_TAG = "rayrec.checkpoint"


@dataclass
class Outcome:
    """What a run ends with: final metrics, its folder, the checkpoint (an SFT run: the best adapter)."""

    metrics: dict[str, float]
    run_dir: Path | str  # a folder, or the run's object-store URI
    checkpoint: str | None = None
    mlflow_run_id: str | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    log_path: Path | None = None
    tracking_error: str | None = None  # why writes were not logged (``tracking/not_logged`` counts them)


@dataclass
class Run:
    """The run in progress, as the driver hands it to a recipe."""

    dir: Path
    local: bool  # runs in this process (``--local``, or a job without Ray workers)
    resume_from: str | None = None
    callbacks: list = field(default_factory=list)  # Ray Train callbacks (a sweep's report callback)
    console: bool = True  # the driver shows a console: workers send it progress events
    tracker: Tracker = field(default_factory=Tracker.null)
    shared: Any = None  # a sweep trial: what the sweep's driver made once for every trial (the recipe's ``share``)
    store: ObjectFolder | None = None  # on object storage: the run's folder there (``dir`` is then the driver's own)

    @property
    def where(self) -> str:
        """The run's checkpoints: its folder, or its object-store URI."""
        return self.store.uri if self.store is not None else str(self.dir)


@dataclass
class TrainerParts:
    """A recipe's share of its ``TorchTrainer``: the worker loop and what it reads."""

    loop: Callable[[dict[str, Any]], None]
    config: dict[str, Any]  # added to the driver's loop config (job, tracking, resume, console)
    datasets: dict[str, Any]
    dataset_config: Any = None  # ray.train.DataConfig
    score: tuple[str | None, str] = (None, "max")  # (metric, mode) ranking checkpoints to keep
    env: dict[str, str] = field(default_factory=dict)  # worker environment variables


@dataclass(frozen=True)
class Recipe:
    """What one job kind does differently; the driver does the rest (see the module docstring)."""

    name: str
    prepare: Callable[[Any, Run], Any]  # (cfg, run) -> inputs, on the driver before any worker
    record: Callable[[Tracker, Any], None]  # log what the run trains on
    local: Callable[[Any, Any, Run], Outcome]  # (cfg, inputs, run): train in this process
    trainer: Callable[[Any, Any, Run], TrainerParts]  # (cfg, inputs, run): the Ray Train worker loop
    outcome: Callable[[Any, Any, Run], Outcome]  # (cfg, ray result, run)
    console_keys: Callable[[Any], list[str]]  # metrics of the console's epoch line
    share: Callable[[Any], Any]  # a sweep: what all trials read, made once on its driver; returns what
    # trials get as ``Run.shared`` (e.g. object refs of the row tables), or None
    curves: tuple[str, ...] = ("train/loss", "val/ndcg@10", "val/hr@10", "train/grad_norm")
    tags: Callable[[Any], dict[str, str]] = lambda cfg: {}
    in_process: Callable[[Any], bool] = lambda cfg: False  # e.g. a parameter-free baseline
    checkpoint_label: str = "checkpoint"  # what the checkpoint is called on the console and in MLflow
    object_storage: bool = False  # its checkpoints go through Ray Train only, so run.storage_path may be s3://, gs://


Tracking = Callable[[Any, Path], Tracker]  # (cfg, run folder) -> the run's MLflow handle


def run_job(recipe: Recipe, cfg: Any, *, local: bool = False, source: str | None = None,
            resume_from: str | None = None, callbacks: list | None = None, tracking: Tracking | None = None,
            console: bool = True, verbose: bool = False, shared: Any = None) -> Outcome:
    """Run ``cfg`` with ``recipe`` end to end and return its outcome (see the module docstring).

    ``tracking`` opens the run's MLflow run (default: a run of ``cfg.tracking.experiment``;
    a sweep trial: its child run). ``console``: show progress here and keep the noise in the
    run's log file (off in sweep trials, whose sweep driver owns the console).
    """
    from rayrec.cluster import shared_paths

    cfg = shared_paths(cfg)  # on a cluster: data and checkpoints on its shared storage
    resume_from = checked_resume_from(resume_from)
    in_process = local or recipe.in_process(cfg)
    storage = check_storage(cfg.run.storage_path, recipe, in_process)
    if callbacks and in_process:
        raise ConfigError(f"this {recipe.name} job runs in one process (--local, or a model with nothing to "
                          "train on workers), so Ray Train callbacks (a sweep's reports) would never be called")
    if cfg.tracking.enabled and tracking is None:  # a sweep's trials: its driver checked the store
        check_reachable(resolve_uri(cfg.tracking.uri))
    with ExitStack() as owned:
        run_dir, store = claim_run_dir(storage, cfg.run.name, owned)  # refuses while another process trains it
        with job_console(run_dir, recipe.console_keys(cfg), verbose=verbose, enabled=console) as con:
            run = Run(run_dir, local=in_process, resume_from=resume_from, callbacks=list(callbacks or []),
                      console=con is not None, shared=shared, store=store)
            if not run.local:
                start_ray(cfg, attach=con.attach_ray if con else None)
            inputs = recipe.prepare(cfg, run)
            run.tracker = (tracking or default_tracking(recipe, source, run.where))(cfg, run_dir)
            try:
                recipe.record(run.tracker, inputs)
                with on_signals(at_step_boundary=run.local):  # SIGTERM/SIGHUP/SIGINT: Stopped, nothing half-written
                    outcome = recipe.local(cfg, inputs, run) if run.local else fit_on_ray(recipe, cfg, inputs, run)
                if con is not None and not run.local:
                    con.wait_end()
                finish(run.tracker, recipe, outcome)
                mark_complete(run, outcome)
            except BaseException as e:
                stopped = as_stopped(e)
                if stopped is not None:
                    run.tracker.finish("KILLED", timeout=5)
                    raise Stopped(stopped.signum, f"{stopped}; {resume_hint(run)}") from None
                run.tracker.finish("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED", timeout=5)
                raise
            not_logged = run.tracker.finish("FINISHED") + int(outcome.metrics.get(NOT_LOGGED, 0))
            if not_logged:  # the workers' and the driver's writes MLflow never got
                outcome.metrics[NOT_LOGGED] = not_logged
                outcome.tracking_error = run.tracker.last_error
            outcome.log_path = con.log_path if con else None
    return outcome


def start_ray(cfg: Any, attach: Callable[[], None] | None = None) -> None:
    """Start or join Ray, take over its forwarded output (``attach``), and check the job fits."""
    from rayrec.cluster import check_shared_storage, ensure_ray, preflight

    ensure_ray()
    if attach is not None:
        attach()
    preflight(cfg)
    check_shared_storage(cfg)  # on several nodes: every one sees the run's storage and data


# ----------------------------------------------------------------------------- run folder


def checked_resume_from(path: str | Path | None) -> str | None:
    """``--resume-from``: absolute (workers run in other folders), and a checkpoint, before any worker starts."""
    if path is None or is_object_uri(str(path)):
        return None if path is None else str(path)
    found = Path(path).expanduser().resolve()
    if not found.is_dir():
        raise ConfigError(f"--resume-from {path}: no such checkpoint folder ({found}); give one such as "
                          "runs/NAME/epoch_0003 or runs/NAME/final")
    return str(found)


def check_storage(path: Path | str, recipe: Recipe | None = None, in_process: bool = False) -> Path | ObjectFolder:
    """The storage folder must be creatable and writable before any worker starts; an object-store URI
    must be writable, and only for a recipe whose checkpoints all go through Ray Train."""
    if is_object_uri(path):
        if recipe is not None and (in_process or not recipe.object_storage):
            why = ("runs in one process (--local, or a model with nothing to train on workers)" if in_process
                   else f"is a {recipe.name} job, whose trainer writes its checkpoints as local files")
            raise ConfigError(f"run.storage_path {path}: this job {why}; object storage holds the checkpoints "
                              "Ray Train workers report. Give it a folder (a shared one on a cluster)")
        return open_folder(str(path))
    path = Path(path).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RayrecError(f"run.storage_path {path} cannot be created: {e.strerror}") from None
    if not os.access(path, os.W_OK):
        raise RayrecError(f"run.storage_path {path} is not writable")
    return path


def local_checkpoint(path: Path | str) -> Path:
    """A run or checkpoint folder to read in this process: ``path``, or for an object-store URI a local copy
    of the checkpoint (of a finished run: its chosen one; of an unfinished one: its newest), kept under
    ``rayrec.storage.local_home`` (a checkpoint is written once, so the copy stays true)."""
    if not is_object_uri(str(path)):
        return Path(path).expanduser()
    from rayrec.train.checkpoint import STATE_FILE

    folder = ObjectFolder.at(str(path))
    if not folder.exists(STATE_FILE):  # a run: its chosen checkpoint
        pointer = folder.read_text(BEST_CHECKPOINT)
        chosen = pointer.strip() if pointer else newest_stored(folder)
        if chosen is None:
            raise RayrecError(f"{path}: neither a checkpoint (no {STATE_FILE}) nor a run with checkpoints")
        log.info("%s: using its checkpoint %s", path, chosen)
        folder = ObjectFolder.at(chosen)
    return folder.download(local_home(folder.uri))


def run_checkpoint(path: Path | None) -> Path | None:
    """``path``, or the checkpoint of the finished run whose folder ``path`` is (its ``best_checkpoint.txt``)."""
    if path is None:
        return None
    pointer = Path(path).expanduser() / BEST_CHECKPOINT
    if pointer.is_file():
        found = Path(pointer.read_text().strip())
        log.info("%s is a finished run: using its checkpoint %s", path, found)
        return found
    return path


def claim_run_dir(storage: Path | ObjectFolder, name: str, owned: ExitStack) -> tuple[Path, ObjectFolder | None]:
    """``pick_run_dir``, owned (``rayrec.run_lock``) until ``owned`` closes; a run that completed while
    this process waited for it moves on to the next ``name_vN``.

    On object storage the run's folder there comes second, and the lock and the console log are kept
    in the driver's own folder of it (``rayrec.storage.local_home``): the lock guards against a second
    trainer of the run on this host (an object store has no lock to take).
    """
    while True:
        picked = pick_run_dir(storage, name)
        store = picked if isinstance(picked, ObjectFolder) else None
        run_dir = local_home(store.uri) if store is not None else picked
        attempt = ExitStack()
        attempt.enter_context(hold_run(run_dir))
        if not is_complete(picked):
            owned.enter_context(attempt)
            clear_stale_temporaries(run_dir)  # half-written files of a writer that was killed
            return run_dir, store
        attempt.close()


def is_complete(run: Path | ObjectFolder) -> bool:
    """The run finished: its folder holds the completion marker."""
    return run.exists(COMPLETE_MARKER) if isinstance(run, ObjectFolder) else (run / COMPLETE_MARKER).exists()


def mark_complete(run: Run, outcome: Outcome) -> None:
    """The run's last writes: the pointer to its checkpoint (what a later stage reads from the run folder,
    GRPO the SFT adapter), its final metrics, then the completion marker. On object storage each is one
    whole object."""
    import json

    final = json.dumps({"metrics": outcome.metrics, "checkpoint": outcome.checkpoint}, default=str)
    if run.store is not None:
        outcome.run_dir = run.store.uri
        if outcome.checkpoint:
            run.store.write_text(BEST_CHECKPOINT, str(outcome.checkpoint))
        run.store.write_text(FINAL_METRICS, final)
        run.store.write_text(COMPLETE_MARKER, outcome.mlflow_run_id or "")
        return
    if outcome.checkpoint:
        atomic_write(run.dir / BEST_CHECKPOINT, str(outcome.checkpoint))
    atomic_write(run.dir / FINAL_METRICS, final)
    atomic_write(run.dir / COMPLETE_MARKER, outcome.mlflow_run_id or "")


def finished_result(run: Path | ObjectFolder) -> dict[str, Any] | None:
    """``{"metrics": ..., "checkpoint": ...}`` of a run that completed (``mark_complete``), else None."""
    import json

    if not is_complete(run):
        return None
    text = run.read_text(FINAL_METRICS) if isinstance(run, ObjectFolder) else (
        (run / FINAL_METRICS).read_text() if (run / FINAL_METRICS).is_file() else None)
    return json.loads(text) if text else {"metrics": {}, "checkpoint": None}


def resume_hint(run: Run) -> str:
    """Where a stopped run stands, and how to go on."""
    from rayrec.train.checkpoint import latest_checkpoint

    newest = newest_stored(run.store) if run.store is not None else latest_checkpoint(run.dir)
    if newest is None:
        return f"no checkpoint was written yet in {run.where}: run the same command again to start over"
    return f"the newest complete checkpoint is {newest}: run the same command again to resume from it"


def newest_stored(store: ObjectFolder) -> str | None:
    """The newest complete checkpoint of an object-store run (its ``state.pt`` is there: Ray uploads a
    checkpoint's files one object each, so a folder cut short lacks it or holds it whole)."""
    from rayrec.train.checkpoint import STATE_FILE, checkpoint_rank

    ranked = sorted((checkpoint_rank(n), n) for n in store.folders() if checkpoint_rank(n)[0] >= 0)
    for _, name in reversed(ranked):
        if store.exists(f"{name}/{STATE_FILE}"):
            return store.child(name).uri
    return None


def pick_run_dir(storage: Path | ObjectFolder, name: str) -> Path | ObjectFolder:
    """``storage/name``, or the next ``name_vN`` if that run already completed.

    An unfinished run folder is reused, so re-running after a crash resumes it.
    """
    def child(n: str) -> Path | ObjectFolder:
        return storage.child(n) if isinstance(storage, ObjectFolder) else storage / n

    candidate, n = child(name), 1
    while is_complete(candidate):
        n += 1
        candidate = child(f"{name}_v{n}")
    return candidate


# ----------------------------------------------------------------------------- MLflow


def default_tracking(recipe: Recipe, source: str | None, key: str | None = None) -> Tracking:
    """Opens the run's MLflow run; ``key`` (default: the run folder) names the run across driver restarts:
    an object-store run's URI, so a re-run from another machine continues the same MLflow run."""
    def open_tracking(cfg: Any, run_dir: Path) -> Tracker:
        if not cfg.tracking.enabled:
            return Tracker.null()
        tags = {"rayrec.recipe": recipe.name, **recipe.tags(cfg), "rayrec.job_file": source or ""}
        tracker = open_run(resolve_uri(cfg.tracking.uri), cfg.tracking.experiment, key or str(run_dir), run_dir.name,
                           tags=tags, max_outage_s=cfg.tracking.max_outage_s)
        changed = tracker.log_params(flatten(cfg))
        if not changed:
            tracker.log_text(dump_job(cfg), "config/resolved.yaml")
            return tracker
        # a resume with another config: recorded, not refused (more epochs, other workers are common)
        version = int(tracker.tag("rayrec.config_version") or 1) + 1
        tracker.log_text(dump_job(cfg), f"config/resolved.v{version}.yaml")
        tracker.set_tags({"rayrec.config_version": version})
        log.warning("this run resumes with a changed config (%s); MLflow keeps the first values as params, the "
                    "changes as tags rayrec.changed.*, the new config as config/resolved.v%d.yaml. For a separate "
                    "record, start a new run instead (another run.name)",
                    "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in sorted(changed.items())), version)
        return tracker

    return open_tracking


def finish(tracker: Tracker, recipe: Recipe, outcome: Outcome) -> None:
    """Driver-side records: the checkpoint, the best epoch, learning curves (the driver sets the status
    once the completion marker is written)."""
    if not tracker.active:
        return
    tags = {CHECKPOINT_TAG: outcome.checkpoint or ""}
    if recipe.checkpoint_label != "checkpoint":
        tags[f"rayrec.{recipe.checkpoint_label}"] = outcome.checkpoint or ""
    if "best_epoch" in outcome.metrics:
        tags["rayrec.best_epoch"] = outcome.metrics["best_epoch"]
    tracker.set_tags(tags)
    from rayrec.tracking.plots import learning_curves  # matplotlib: only where a figure is drawn

    curves = {k: tracker.history(k) for k in recipe.curves}
    if any(curves.values()):
        tracker.log_figure(learning_curves(curves), "learning_curves.png")


# ----------------------------------------------------------------------------- Ray Train


def build_trainer(cfg: Any, parts: TrainerParts, *, run_dir: Path | str, callbacks: list | None = None,
                  base_config: dict[str, Any] | None = None):
    """The one ``TorchTrainer`` builder: the job's ``scaling`` and ``run`` sections + the recipe's loop.

    ``run_dir``: the run's folder or object-store URI. Ray gets the URI as a string, so each of its
    processes resolves the store from its own environment (no credentials travel with the trainer)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    metric, mode = parts.score
    parent, _, name = str(run_dir).rstrip("/").rpartition("/")
    run = ray.train.RunConfig(
        name=name,
        storage_path=parent,
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.checkpoint.num_to_keep,
                                                     checkpoint_score_attribute=metric, checkpoint_score_order=mode),
        # max_failures: worker deaths survived (resume from the newest checkpoint); the controller
        # limit bounds the worker-group start attempts, which Ray would otherwise retry forever
        failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures,
                                               controller_failure_limit=cfg.scaling.start_attempts - 1),
        callbacks=callbacks or [],
        logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        worker_runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", ""), **parts.env}},
    )
    scaling = ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                      resources_per_worker=dict(cfg.scaling.resources_per_worker))
    return TorchTrainer(
        parts.loop,
        train_loop_config={"job": cfg.model_dump(mode="json"), **(base_config or {}), **parts.config},
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        scaling_config=scaling,
        run_config=run,
        datasets=parts.datasets,
        dataset_config=parts.dataset_config,
    )


def fit_on_ray(recipe: Recipe, cfg: Any, inputs: Any, run: Run) -> Outcome:
    """Build the recipe's trainer, fit it within ``scaling.start_timeout_s``, read the outcome."""
    from rayrec.train.checkpoint import newest_readable

    # may be newer than Ray's registered one (stopped right after a report)
    newest = newest_stored(run.store) if run.store is not None else newest_readable(run.dir)
    base = {"tracking_uri": run.tracker.uri, "mlflow_run_id": run.tracker.run_id,
            "resume_from": run.resume_from, "console": run.console, "newest_on_disk": str(newest) if newest else None}
    trainer = build_trainer(cfg, recipe.trainer(cfg, inputs, run), run_dir=run.where, callbacks=run.callbacks,
                            base_config=base)
    return recipe.outcome(cfg, fit(trainer, cfg), run)


def fit(trainer, cfg: Any):
    """``trainer.fit()`` with the start timeout, a placement error that names the shortfall,
    and a failed run as a ``RayrecError``."""
    from rayrec.cluster import PlacementWatch, placement_error, ray_train_env

    # Ray Train's fit() takes SIGINT over from the caller (its handler exits the process with status 1 and no
    # word); rayrec's own (``rayrec.stopping``) handles SIGINT as it does SIGTERM and SIGHUP
    trainer._register_sigint_handler = lambda controller: None
    try:
        with ray_train_env(cfg), PlacementWatch(cfg):
            result = trainer.fit()
    except Exception as e:
        friendly = placement_error(e, cfg) or worker_error(e)
        if friendly is None:
            raise
        raise friendly from None
    if result.error:
        raise worker_error(result.error) or RayrecError(f"training failed: {result.error}")
    return result


def worker_error(err: BaseException) -> RayrecError | None:
    """One line for Ray Train giving up on the workers (``WorkerGroupError``): the lowest failed rank's own
    exception (a rayrec error: its message; another: its type and last line), not Ray's traceback
    snippets, which stay in the run's log. None for any other error."""
    failures = getattr(err, "worker_failures", None)
    if not failures:
        return None
    rank, exc = min(failures.items(), key=lambda kv: kv[0])
    cause = getattr(exc, "cause", None) or exc  # a RayTaskError wraps the worker's own exception
    if isinstance(cause, RayrecError):
        said = str(cause).strip().splitlines()[0]
    else:
        lines = [line.strip() for line in str(cause).strip().splitlines() if line.strip()]
        said = f"{type(cause).__name__}: {lines[-1] if lines else ''}".rstrip(": ")
    more = f" (and {len(failures) - 1} more worker(s))" if len(failures) > 1 else ""
    logging.getLogger("ray.train").warning("%s", err)  # Ray's own account, traces included: the run's log only
    return RayrecError(f"training failed on worker rank {rank}{more}: {said}")


# ----------------------------------------------------------------------------- the final table


def summary_rows(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    keys = sorted(k for k in metrics if "/" in k and not k.startswith(("train/lr", "train/samples")))
    rows = [(k, f"{metrics[k]:g}" if k.endswith(("/rows", "/not_logged")) else f"{metrics[k]:.4f}") for k in keys]
    for k in ("best_epoch", "epoch", "stopped_early"):
        if k in metrics:
            rows.append((k, f"{metrics[k]:g}"))
    return rows


def print_table(rows: list[tuple[str, str]], title: str) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"\n{title}\n{'-' * (width + 12)}")
    for k, v in rows:
        print(f"{k:<{width}}  {v:>10}")


def print_outcome(recipe: Recipe, outcome: Outcome, title: str) -> None:
    """The final table, then where everything is; the run's log file on the last line."""
    print_table(summary_rows(outcome.metrics) or [("(no metrics)", "-")], title)
    label = f"{recipe.checkpoint_label}:"
    print(f"\n{'run folder:':<12} {outcome.run_dir}\n{label:<12} {outcome.checkpoint}\n"
          f"{'mlflow run:':<12} {outcome.mlflow_run_id}")
    if outcome.log_path is not None:
        print(f"{'log:':<12} {outcome.log_path} (Ray and worker output; -v shows it here)")
    if outcome.metrics.get(NOT_LOGGED):
        print(f"\nMLflow did not get {outcome.metrics[NOT_LOGGED]:g} writes of this run (metrics, tags or artifacts; "
              f"{outcome.tracking_error or 'the store did not answer'}); the checkpoints and this table are complete")
