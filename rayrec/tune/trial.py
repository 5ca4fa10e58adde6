"""One sweep trial: a Tune function trainable that runs the trial's job through the one driver.

The Train V2 pattern for Train inside Tune: the trial's function runs on a small driver
slot (``tune.with_resources``) and calls ``run_job`` with the job's recipe, as `rayrec train`
or `rayrec sft` would, so a trial gets the storage root, the preflight, the start timeout and
the recipe's preparation like any job. Two things differ: ``SweepReportCallback`` is among
the Train callbacks (the workers' per-epoch validation metrics reach Tune, so ASHA can stop a
weak trial after any epoch), and the MLflow run is the trial's child run of the sweep.

Inside the trainable only ``ray.tune`` APIs are used (``tune.get_context``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from pydantic import BaseModel

from rayrec.config.kinds import SEQUENTIAL, kind_named
from rayrec.config.loader import validate
from rayrec.storage import storage_value
from rayrec.tune.paths import set_paths
from rayrec.tune.reports import SweepReportCallback

log = logging.getLogger(__name__)


@dataclass
class TrialPlan:
    """Everything a trial needs, computed once on the sweep driver (plain, picklable data)."""

    sweep: str
    sweep_dir: str
    base: dict[str, Any]  # the base job with absolute paths, as plain data
    job_source: str
    metric: str
    mode: str
    epochs: int | None  # set train.epochs to this (None: keep the job's)
    scaling: dict[str, Any]
    tracking_uri: str | None
    parent_run_id: str | None
    searched: list[str] = field(default_factory=list)
    kind: str = SEQUENTIAL.name  # the base job's kind (``rayrec.config.kinds``)
    shared: Any = None  # what the recipe's ``share`` made once on the sweep driver (object refs travel with the plan)


def trial_job(plan: TrialPlan, params: dict[str, Any], *, name: str) -> BaseModel:
    """The base job with the trial's values, the sweep's epochs and the per-trial resources
    (and, for a sequential job, the sweep's metric for model selection)."""
    kind = kind_named(plan.kind)
    raw = set_paths(plan.base, params)
    raw["scaling"].update(plan.scaling)
    if kind is SEQUENTIAL:  # a generative job keeps its checkpoints by its own selection_metric
        raw["train"]["early_stopping"].update(metric=plan.metric, mode=plan.mode)
    if plan.epochs is not None:
        raw["train"]["epochs"] = plan.epochs
    raw["run"]["name"] = name
    shown = ", ".join(f"{k}={v!r}" for k, v in params.items())
    return validate(kind.schema, raw, source=f"trial {name} ({shown})")


def trial_dirname(trial) -> str:
    """Tune's folder and display name of a trial (module-level so the Tuner state pickles)."""
    return trial_dirname_of(trial.trial_id)


def run_trial(config: dict[str, Any], plan: TrialPlan) -> None:
    """The Tune trainable: the trial's job through ``run_job``, metrics reported to Tune per epoch."""
    from ray import tune

    from rayrec.recipes import recipe_for
    from rayrec.runs import run_job
    from rayrec.tune.mlflow_sweep import open_child
    from rayrec.tune.space import job_epochs, reports_clock

    trial_id = tune.get_context().get_trial_id()
    params = {k: _native(config[k]) for k in plan.searched if k in config}
    cfg = trial_job(plan, params, name=f"{plan.sweep}-{trial_id}")
    # the run folder: inside the trial's (a folder, or an object-store URI)
    cfg.run.storage_path = storage_value(f"{plan.sweep_dir.rstrip('/')}/{trial_dirname_of(trial_id)}")
    kind = kind_named(plan.kind)
    report = SweepReportCallback(plan.metric, plan.mode, last_epoch=None if kind.test_report else job_epochs(cfg),
                                 steps_per_report=cfg.train.save_steps if reports_clock(cfg) else None)
    if replay_finished(cfg, report):
        return
    run_job(recipe_for(cfg), cfg, callbacks=[report], tracking=partial(open_child, plan, trial_id, params),
            console=False, shared=plan.shared)


def replay_finished(cfg: BaseModel, report: SweepReportCallback) -> bool:
    """A trial whose run already completed, started again by a restored sweep (its driver died before Tune
    saved that the trial had ended): report the run's final result to Tune instead of training it again as
    a new run folder (``NAME_v2``) with a second MLflow child run. False when the run did not complete."""
    from ray import tune

    from rayrec.runs import check_storage, finished_result
    from rayrec.storage import ObjectFolder
    from rayrec.tune.reports import CHECKPOINT_KEY

    storage = check_storage(cfg.run.storage_path)
    done = finished_result(storage.child(cfg.run.name) if isinstance(storage, ObjectFolder)
                           else storage / cfg.run.name)
    if done is None:
        return False
    metrics = report.objective.complete(dict(done["metrics"]))
    if done.get("checkpoint"):
        metrics[CHECKPOINT_KEY] = done["checkpoint"]
    log.info("trial run %s had completed: its final result is reported again, nothing is trained", cfg.run.name)
    tune.report(metrics)
    return True


def trial_dirname_of(trial_id: str) -> str:
    return f"trial_{trial_id}"


def _native(value: Any) -> Any:
    """numpy scalars from the samplers as plain values (pydantic and YAML want them)."""
    return value.item() if hasattr(value, "item") else value
