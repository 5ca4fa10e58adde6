"""One sweep trial: a Tune function trainable that builds and fits a Ray Train ``TorchTrainer``.

The Train V2 pattern for Train inside Tune: the trial's function runs on a small
driver slot (``tune.with_resources``), builds the trial's ``TorchTrainer`` with
``TuneReportCallback`` among its Train callbacks, and calls ``fit()``. The Train
workers report validation metrics every epoch; the callback forwards them to Tune,
so ASHA can stop a weak trial after any epoch.

A sequential-model trial builds the trainer of ``rayrec train``; a generative trial runs
``rayrec sft``'s recipe (``run_sft``) with the callback, in the trial's MLflow child run.

Inside the trainable only ``ray.tune`` APIs are used (``tune.get_context``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from rayrec.config.loader import dump_job, validate
from rayrec.errors import RayrecError
from rayrec.train.worker import DataInfo
from rayrec.tune.kinds import GENREC, SEQUENTIAL, kind_named
from rayrec.tune.paths import set_paths

log = logging.getLogger(__name__)

#: Tune's clock for ASHA: the epoch the Train loop reports (the final test report repeats it).
TIME_ATTR = "epoch"
#: Result key holding the checkpoint path (set by Ray's ``TuneReportCallback``).
CHECKPOINT_KEY = "checkpoint_path"
#: Set in the report of a trial's last epoch when its training loop ends without a test report
#: (generative trials), so that a trial that ran to the end is told from one stopped early.
LAST_EPOCH_KEY = "last_epoch"


def objective_key(metric: str) -> str:
    """What Tune, ASHA and Optuna rank on: the best value of ``metric`` so far in the trial.

    Every report carries it (also the final test report, which has no ``val/`` metrics),
    and it is what the trial's model selection (early stopping) keeps.
    """
    return f"best/{metric}"


def is_test_report(result: dict[str, Any]) -> bool:
    """The sequential Train loop's last report: the best weights on test."""
    return any(k.startswith("test/") for k in result)


def is_final(result: dict[str, Any]) -> bool:
    """A trial's last report, which marks a trial that ran to the end: the test report
    (sequential trials) or the report of the last epoch (generative trials)."""
    return is_test_report(result) or bool(result.get(LAST_EPOCH_KEY))


@dataclass
class TrialPlan:
    """Everything a trial needs, computed once on the sweep driver (plain, picklable data)."""

    sweep: str
    sweep_dir: str
    base: dict[str, Any]  # the base job with absolute paths, as plain data
    job_source: str
    info: DataInfo | None  # the prepared data (sequential trials; generative trials read the job's data)
    metric: str
    mode: str
    epochs: int | None  # set train.epochs to this (None: keep the job's)
    scaling: dict[str, Any]
    tracking_uri: str | None
    parent_run_id: str | None
    searched: list[str] = field(default_factory=list)
    kind: str = SEQUENTIAL.name  # the base job's kind (``rayrec.tune.kinds``)


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
    return f"trial_{trial.trial_id}"


def run_trial(config: dict[str, Any], plan: TrialPlan) -> None:
    """The Tune trainable: one Ray Train run of the trial's job, metrics reported per epoch."""
    from ray import tune

    from rayrec.train.cluster import quiet_ray_data

    quiet_ray_data()  # this process drives the trial's datasets: no Ray Data bars per trial

    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    params = {k: _native(config[k]) for k in plan.searched if k in config}
    cfg = trial_job(plan, params, name=f"{plan.sweep}-{trial_id}")
    trial_dir = Path(plan.sweep_dir) / f"trial_{trial_id}"
    if plan.kind == GENREC.name:
        _fit_genrec(cfg, plan, trial_id, params, trial_dir)
    else:
        _fit_sequential(cfg, plan, trial_id, params, trial_dir)


def _fit_sequential(cfg, plan: TrialPlan, trial_id: str, params: dict[str, Any], trial_dir: Path) -> None:
    """The trainer of `rayrec train`; its workers log each epoch into the trial's child run."""
    from rayrec.train.ray_trainer import build_trainer
    from rayrec.tune.mlflow_sweep import finish_child, open_child

    run_dir = trial_dir / "train"
    tracker = open_child(plan, trial_id, params, run_dir, dump_job(cfg))
    trainer = build_trainer(cfg, plan.info, run_dir=run_dir, tracking_uri=tracker.uri, mlflow_run_id=tracker.run_id,
                            callbacks=[SweepReportCallback(plan.metric, plan.mode)], progress=False)
    result = trainer.fit()
    if result.error:
        raise RayrecError(f"trial {trial_id}: training failed: {result.error}")
    finish_child(tracker, result.checkpoint.path if result.checkpoint else None)


def _fit_genrec(cfg, plan: TrialPlan, trial_id: str, params: dict[str, Any], trial_dir: Path) -> None:
    """`rayrec sft`'s recipe with the report callback, its run folder in the trial's folder and
    its MLflow run the trial's child run (its workers log each epoch there)."""
    from rayrec.genrec.run import run_sft
    from rayrec.train.run import pick_run_dir
    from rayrec.tune.mlflow_sweep import finish_child, open_child
    from rayrec.tune.space import job_epochs

    cfg.run.storage_path = trial_dir  # run_sft's run folder: trial_dir / run.name (unique per trial)
    tracker = open_child(plan, trial_id, params, pick_run_dir(trial_dir, cfg.run.name), dump_job(cfg))
    report = SweepReportCallback(plan.metric, plan.mode, last_epoch=job_epochs(cfg))
    out = run_sft(cfg, callbacks=[report], tracker=tracker)
    finish_child(tracker, out.adapter, plot=False)  # run_sft drew the learning curves


def _native(value: Any) -> Any:
    """numpy scalars from the samplers as plain values (pydantic and YAML want them)."""
    return value.item() if hasattr(value, "item") else value


def _report_callback_base():
    from ray.tune.integration.ray_train import TuneReportCallback

    return TuneReportCallback


class Objective:
    """Keeps the best value of ``metric`` over a trial's reports and adds the keys the sweep needs.

    ``best/<metric>`` (when the training loop did not report it) and ``epoch`` (the count of
    reports, when missing) end up in every report, so ASHA and Optuna always find them,
    also in the final test report. With ``last_epoch`` (a loop without a test report), the
    report of that epoch is marked final (``LAST_EPOCH_KEY``).
    """

    def __init__(self, metric: str, mode: str, last_epoch: int | None = None) -> None:
        self.metric, self.sign = metric, 1.0 if mode == "max" else -1.0
        self.last_epoch = last_epoch
        self.best: float | None = None
        self.reports = 0

    def complete(self, metrics: dict[str, Any]) -> dict[str, Any]:
        self.reports += 1
        out = dict(metrics)
        value = out.get(self.metric)
        if value is not None and math.isfinite(value) and (self.best is None or self.sign * value > self.sign * self.best):
            self.best = float(value)
        if objective_key(self.metric) not in out and self.best is not None:
            out[objective_key(self.metric)] = self.best
        out.setdefault(TIME_ATTR, self.reports)
        if self.last_epoch is not None and out[TIME_ATTR] >= self.last_epoch - 1e-6:
            out[LAST_EPOCH_KEY] = True
        return out


class SweepReportCallback(_report_callback_base()):
    """``TuneReportCallback`` whose reports always carry the objective and the epoch (see ``Objective``)."""

    def __init__(self, metric: str, mode: str, last_epoch: int | None = None) -> None:
        super().__init__()
        self.objective = Objective(metric, mode, last_epoch)

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        first = self.objective.complete(metrics[0])
        super().after_report(run_context, [first, *metrics[1:]], checkpoint)
