"""MLflow records of a sweep: one parent run, one nested child run per trial.

The parent holds the sweep's settings, the space file, the base job and, at the end,
the best config. Each child holds only the searched params (plus a tag linking the
base job), the per-epoch metrics that the trial's Train workers log, and a final
status: ``completed``, ``stopped_early`` (ASHA or the time budget) or ``failed``
(with its error). A generative trial's child also gets what ``rayrec sft`` records about
its inputs (SID index, prompt samples) and the best adapter as its checkpoint. Children
are found again by tag, so a resumed sweep keeps them.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from rayrec.config.loader import dump_job
from rayrec.console import say
from rayrec.tracking.mlflow_tracking import RUN_KEY_TAG, Tracker, open_run
from rayrec.tune.reports import TIME_ATTR, is_final, is_test_report

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"  # MLflow's own nesting tag (the UI shows children under it)
KIND_TAG, SWEEP_TAG, TRIAL_TAG, STATUS_TAG = "rayrec.kind", "rayrec.sweep", "rayrec.trial_id", "rayrec.trial_status"
ERROR_TAG, CHECKPOINT_TAG, BASE_JOB_TAG = "rayrec.error", "rayrec.checkpoint", "rayrec.base_job"
COMPLETED, STOPPED, FAILED = "completed", "stopped_early", "failed"
MLFLOW_STATUS = {COMPLETED: "FINISHED", STOPPED: "KILLED", FAILED: "FAILED"}


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def open_parent(uri: str, experiment: str, sweep_dir: Path, name: str, *, resume: bool,
                tags: dict[str, str]) -> Tracker:
    """The sweep's parent run: reused on ``--resume`` (whatever its status), else a new one."""
    if resume:
        found = _runs_with_tag(uri, experiment, RUN_KEY_TAG, str(sweep_dir))
        if found:
            run_id = found[0].info.run_id
            _client(uri).update_run(run_id, status="RUNNING")
            log.info("resuming sweep: continuing MLflow parent run %s", run_id)
            return Tracker(uri, run_id)
    return open_run(uri, experiment, str(sweep_dir), name, tags={KIND_TAG: "sweep", **tags})


def _runs_with_tag(uri: str, experiment: str, tag: str, value: str) -> list:
    c = _client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return c.search_runs([exp.experiment_id], filter_string=f"tags.`{tag}` = '{value}'",
                         order_by=["attributes.start_time DESC"], max_results=5)


def open_child(plan, trial_id: str, params: dict[str, Any], cfg, run_dir: Path) -> Tracker:
    """The trial's child run (re-opened when a resumed sweep restarts the trial): the driver's
    ``tracking`` hook for a trial, so it holds the searched params, not the whole job."""
    if not plan.tracking_uri:
        return Tracker.null()
    experiment = plan.base["tracking"]["experiment"]
    tags = {PARENT_TAG: plan.parent_run_id or "", KIND_TAG: "trial", SWEEP_TAG: plan.sweep, TRIAL_TAG: trial_id,
            BASE_JOB_TAG: plan.job_source, "rayrec.model": plan.base["model"].get("name", "genrec-sft")}
    opened = open_run(plan.tracking_uri, experiment, str(run_dir), f"{plan.sweep}/{trial_id}", tags=tags)
    tracker = TrialTracker(opened.uri, opened.run_id, plan.base["tracking"].get("max_outage_s"))
    tracker.log_params(params)
    tracker.log_text(dump_job(cfg), "config/resolved.yaml")
    return tracker


class TrialTracker(Tracker):
    """A trial's child run. Its end status, when the trial did not complete, is the sweep recorder's to
    write (``TrialRecorder``): a trial stopped by ASHA raises inside its loop, so the trial's own code would
    end the run FAILED, racing the recorder's KILLED."""

    def finish(self, status: str = "FINISHED", timeout: float = 30.0) -> int:
        if status == "FINISHED":
            return super().finish(status, timeout)
        return self.close(timeout)


def find_child(uri: str, experiment: str, parent_id: str, trial_id: str) -> str | None:
    c = _client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return None
    found = c.search_runs([exp.experiment_id], max_results=1,
                          filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'")
    return found[0].info.run_id if found else None


def close_open_children(uri: str, experiment: str, parent_id: str, why: str) -> list[str]:
    """End the sweep's child runs still RUNNING once no trial can run again  # -> their trial ids.

    Tune stops the running trials without a completion callback when the sweep ends on its
    budget (epochs or time); their runs are recorded here as stopped early, with the reason.
    """
    c = _client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    open_runs = c.search_runs([exp.experiment_id],
                              filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}' and attributes.status = 'RUNNING'")
    for run in open_runs:
        c.set_tag(run.info.run_id, STATUS_TAG, STOPPED)
        c.set_tag(run.info.run_id, "rayrec.stopped_by", why)
        c.set_terminated(run.info.run_id, MLFLOW_STATUS[STOPPED])
    return [r.data.tags.get(TRIAL_TAG, r.info.run_id) for r in open_runs]


def _tune_callback_base():
    from ray.tune import Callback

    return Callback


class TrialRecorder(_tune_callback_base()):
    """Tune callback on the sweep driver: final status of every trial in its child run,
    and one console line per epoch result.

    Stateless apart from the lazily made client, so Tune can pickle it with the sweep
    and a resumed sweep records into the same parent.
    """

    def __init__(self, uri: str | None, experiment: str, parent_id: str | None, sweep: str, metric: str,
                 objective: str, time_budget_s: float | None, base_job: str = "") -> None:
        self.uri, self.experiment, self.parent_id, self.sweep = uri, experiment, parent_id, sweep
        self.base_job = base_job
        self.metric, self.objective, self.time_budget_s = metric, objective, time_budget_s
        self._start = time.time()

    def setup(self, **info) -> None:
        self._start = time.time()

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if is_test_report(result):  # repeats the last epoch
            return
        value, best = result.get(self.metric), result.get(self.objective)
        shown = f"{value:.4f}" if isinstance(value, float) else "-"
        best_s = f"{best:.4f}" if isinstance(best, float) else "-"
        say(f"[{self.sweep}] trial {trial.trial_id} epoch {result.get(TIME_ATTR, '?')}: "
            f"{self.metric}={shown} (best {best_s})")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        result = trial.last_result or {}
        if is_final(result):
            status, why = COMPLETED, ""
        else:
            budget = self.time_budget_s and time.time() - self._start >= self.time_budget_s
            status, why = STOPPED, "time budget" if budget else "scheduler"
        self._record(trial, status, {"rayrec.stopped_by": why} if why else {})

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        """The trial's driver died (its node lost) and Tune starts it again: it resumes its run."""
        text = _error_text(trial) or ""
        last = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
        say(f"[{self.sweep}] trial {trial.trial_id} lost ({last[-1][:300] if last else 'its driver died'}); "
            f"started again ({trial.num_failures} failure(s) so far), it resumes from its newest checkpoint")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        text = _error_text(trial) or "unknown error (see the trial's error.txt)"
        last = [line for line in str(text).strip().splitlines() if line.strip()]
        self._record(trial, FAILED, {ERROR_TAG: (last[-1] if last else str(text))[:4000]}, error=str(text))

    def _record(self, trial, status: str, tags: dict[str, str], error: str | None = None) -> None:
        say(f"[{self.sweep}] trial {trial.trial_id} {status.replace('_', ' ')}"
            f"{': ' + tags[ERROR_TAG] if ERROR_TAG in tags else ''}")
        if not self.uri or not self.parent_id:
            return
        try:
            self._write(trial, status, tags, error)
        except Exception as e:  # a tracking hiccup must not end the sweep
            log.warning("could not record trial %s in MLflow: %s", trial.trial_id, e)

    def _write(self, trial, status: str, tags: dict[str, str], error: str | None) -> None:
        c = _client(self.uri)
        run_id = find_child(self.uri, self.experiment, self.parent_id, trial.trial_id)
        if run_id is None:  # failed before the trial could open its run
            exp = c.get_experiment_by_name(self.experiment)
            run_id = c.create_run(exp.experiment_id, run_name=f"{self.sweep}/{trial.trial_id}", tags={
                PARENT_TAG: self.parent_id, KIND_TAG: "trial", SWEEP_TAG: self.sweep, TRIAL_TAG: trial.trial_id,
                BASE_JOB_TAG: self.base_job,
            }).info.run_id
        ckpt = (trial.last_result or {}).get("checkpoint_path")
        if c.get_run(run_id).data.tags.get(CHECKPOINT_TAG):  # the trial recorded its own (e.g. the best adapter)
            ckpt = None
        for k, v in {STATUS_TAG: status, **tags, **({CHECKPOINT_TAG: ckpt} if ckpt else {})}.items():
            c.set_tag(run_id, k, str(v))
        if error:
            c.log_text(run_id, error, "error.txt")
        c.set_terminated(run_id, MLFLOW_STATUS[status])


def _error_text(trial) -> str | None:
    """The trial's error trace: Tune writes it to the trial's local folder first, storage later."""
    path = getattr(trial, "error_file", None)
    if path and Path(path).is_file():
        return Path(path).read_text(errors="replace")
    return trial.get_error()
