"""The sweep runner's parts without starting Ray: ASHA rungs, trial packing on a small
machine, sweep folders, the objective added to every report, and the MLflow status of
trials (completed / stopped early / failed with its error)."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from rayrec.config import dump_job
from rayrec.errors import RayrecError
from rayrec.tracking.mlflow_tracking import open_run
from rayrec.tune import runner
from rayrec.tune.mlflow_sweep import TrialRecorder
from rayrec.tune.reports import Objective
from rayrec.tune.runner import (
    COMPLETE_MARKER,
    TrialRow,
    asha_rungs,
    best_row,
    fit_concurrency,
    pick_sweep_dir,
)
from rayrec.tune.space import load_space


@pytest.fixture
def sweep(tiny_job, tmp_path):
    (tmp_path / "job.yaml").write_text(dump_job(tiny_job))
    space = {"job": "job.yaml", "num_samples": 4, "max_concurrent_trials": 2,
             "params": {"model.dropout": {"dist": "uniform", "low": 0.0, "high": 0.3}},
             "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2, "max_epochs": 8}}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    return load_space(tmp_path / "space.yaml")


def test_asha_compares_below_the_last_epoch_only(sweep):
    assert asha_rungs(1, 2, 8) == [1, 2, 4]
    assert asha_rungs(1, 3, 10) == [1, 3, 9]
    assert asha_rungs(2, 2, 9) == [2, 4, 8] and asha_rungs(2, 2, 8) == [2, 4]
    scheduler = runner.make_scheduler(sweep)
    milestones = sorted(m for m, _ in scheduler._brackets[0]._rungs)
    assert milestones == [1, 2, 4] and scheduler._time_attr == "epoch"  # never at epoch 8: it still reports test


def test_trials_are_packed_leaving_a_cpu_for_ray_data(sweep, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    assert fit_concurrency(sweep) == 2  # 2 x (0.25 driver + 0.25 worker) = 1 CPU, 1 left for Ray Data
    sweep.space.max_concurrent_trials = 4
    assert fit_concurrency(sweep) == 2
    sweep.space.trial.resources_per_worker = {"CPU": 1.0}
    with pytest.raises(RayrecError, match=r"one trial needs 1.25 CPUs .* the cluster has 2 CPUs \(1 kept for Ray Data\)"):
        fit_concurrency(sweep)


def test_custom_resources_of_trials_bound_the_concurrency_or_are_named_when_missing(sweep, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "trial_slot": 2.0})
    sweep.space.max_concurrent_trials = 4
    sweep.space.trial.driver_resources = {"trial_slot": 1.0}
    assert fit_concurrency(sweep) == 2  # one trial driver per slot
    sweep.space.trial.driver_resources = {"node_gpu_a": 1.0}
    with pytest.raises(RayrecError, match=r"one trial needs 1 of the resource 'node_gpu_a' .* the cluster has 0"):
        fit_concurrency(sweep)


def test_sweep_folder_new_versioned_or_resumed(tmp_path):
    assert pick_sweep_dir(tmp_path, "s", resume=False).dir == tmp_path / "s"
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / COMPLETE_MARKER).write_text("")
    assert pick_sweep_dir(tmp_path, "s", resume=False).dir == tmp_path / "s_v2"
    with pytest.raises(RayrecError, match="--resume: no saved sweep at .*s; run without --resume"):
        pick_sweep_dir(tmp_path, "s", resume=True)


def test_objective_is_in_every_report_including_the_final_one():
    obj = Objective("val/ndcg@10", "max")
    r1 = obj.complete({"epoch": 1, "val/ndcg@10": 0.2})
    r2 = obj.complete({"epoch": 2, "val/ndcg@10": 0.1})
    final = obj.complete({"test/ndcg@10": 0.15})  # the loop's test report has no val/ metrics
    assert [r["best/val/ndcg@10"] for r in (r1, r2, final)] == [0.2, 0.2, 0.2]
    assert final["epoch"] == 3  # filled in when the loop does not report it
    kept = Objective("val/mean_rank", "min").complete({"val/mean_rank": 5.0, "best/val/mean_rank": 4.0})
    assert kept["best/val/mean_rank"] == 4.0  # the loop's own value wins


def test_best_row_is_picked_on_validation_only():
    rows = [TrialRow("a", "completed", 8, {}, 0.30), TrialRow("b", "stopped_early", 2, {}, 0.31),
            TrialRow("c", "failed", 0, {}, None)]
    assert best_row(rows, "max").trial_id == "b" and best_row(rows, "min").trial_id == "a"
    assert best_row([rows[2]], "max") is None


def _trial(trial_id: str, last_result: dict, error: str | None = None):
    return types.SimpleNamespace(trial_id=trial_id, last_result=last_result, get_error=lambda: error, error_file=None)


def test_trial_recorder_writes_each_final_status(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent = open_run(uri, "exp", str(tmp_path / "sweep"), "sweep")
    child = open_run(uri, "exp", str(tmp_path / "t1"), "sweep/t1",
                     tags={"mlflow.parentRunId": parent.run_id, "rayrec.trial_id": "t1"})
    rec = TrialRecorder(uri, "exp", parent.run_id, "sweep", "val/ndcg@10", "best/val/ndcg@10", None, "/jobs/j.yaml")
    rec.on_trial_result(0, [], _trial("t1", {}), {"epoch": 1, "val/ndcg@10": 0.25, "best/val/ndcg@10": 0.25})
    rec.on_trial_complete(0, [], _trial("t1", {"epoch": 2, "best/val/ndcg@10": 0.3}))
    rec.on_trial_error(0, [], _trial("t2", {}, "Traceback (most recent call last):\n  ...\nValueError: boom\n"))
    c = MlflowClient(uri)
    stopped = c.get_run(child.run_id)
    assert stopped.info.status == "KILLED" and stopped.data.tags["rayrec.trial_status"] == "stopped_early"
    failed = c.search_runs([c.get_experiment_by_name("exp").experiment_id], "tags.`rayrec.trial_id` = 't2'")[0]
    assert failed.info.status == "FAILED" and failed.data.tags["rayrec.error"] == "ValueError: boom"
    assert failed.data.tags["mlflow.parentRunId"] == parent.run_id and failed.data.tags["rayrec.base_job"] == "/jobs/j.yaml"
    assert [a.path for a in c.list_artifacts(failed.info.run_id)] == ["error.txt"]
    out = capsys.readouterr().out
    assert "[sweep] trial t1 epoch 1: val/ndcg@10=0.2500 (best 0.2500)" in out
    assert "[sweep] trial t2 failed: ValueError: boom" in out
    rec.on_trial_complete(0, [], _trial("t1", {"epoch": 2, "test/ndcg@10": 0.2}))
    assert c.get_run(child.run_id).data.tags["rayrec.trial_status"] == "completed"


def test_dry_run_prints_the_plan_without_ray(sweep, capsys):
    from rayrec.cli import main

    assert main(["tune", str(sweep.source), "--dry-run", "num_samples=3"]) == 0
    out = capsys.readouterr().out
    assert "sweep space: 3 trials of" in out and "compared at epochs 1, 2, 4" in out
    assert out.count("model.dropout=") == 5


def test_relative_paths_become_absolute(sweep):
    job = runner.absolute_paths(sweep.job.model_copy(update={"data": sweep.job.data.model_copy(
        update={"path": Path("data/x")})}))
    assert job.data.path.is_absolute() and job.run.storage_path.is_absolute()


def test_a_stopped_trial_ends_killed_whatever_order_the_two_sides_finish_in(tmp_path, monkeypatch):
    """ASHA stops a trial by raising inside its loop: the trial's driver code (run_job) then ends the run
    FAILED, racing the sweep recorder's KILLED. The trial's child run leaves its end status to the recorder."""
    from rayrec.tune import mlflow_sweep

    monkeypatch.setattr(mlflow_sweep, "dump_job", lambda cfg: "{}")  # the resolved YAML is not tested here
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent = open_run(uri, "exp", "/sweep", "sw", tags={"rayrec.kind": "sweep"})
    plan = types.SimpleNamespace(tracking_uri=uri, parent_run_id=parent.run_id, sweep="sw", job_source="job.yaml",
                                 base={"tracking": {"experiment": "exp"}, "model": {"name": "sasrec"}})
    child = mlflow_sweep.open_child(plan, "t1", {}, None, tmp_path / "t1")
    recorder = TrialRecorder(uri, "exp", parent.run_id, "sw", "val/ndcg@10", "best/val/ndcg@10", None)
    trial = types.SimpleNamespace(trial_id="t1", last_result={"epoch": 1, "val/ndcg@10": 0.1}, error_file=None)
    recorder.on_trial_complete(0, [], trial)  # the recorder first ...
    child.finish("FAILED")  # ... then the trial's own failure path
    assert MlflowClient(uri).get_run(child.run_id).info.status == "KILLED"


def test_a_trial_whose_run_had_completed_reports_its_final_result_and_trains_nothing(tiny_job, tmp_path, monkeypatch):
    """A restored sweep starts a trial again whose run completed before the sweep's driver died: the run's
    final metrics go to Tune (objective, clock, checkpoint) and no new run folder (``_v2``) is made."""
    import json
    from types import SimpleNamespace

    from ray import tune

    from rayrec.runs import COMPLETE_MARKER as RUN_DONE
    from rayrec.runs import FINAL_METRICS
    from rayrec.tune.reports import CHECKPOINT_KEY, Objective, is_final
    from rayrec.tune.trial import replay_finished

    reported: list[dict] = []
    monkeypatch.setattr(tune, "report", lambda metrics, **kw: reported.append(metrics))
    cfg = tiny_job.model_copy(deep=True)
    cfg.run.storage_path, cfg.run.name = tmp_path / "trial_ab12", "s-ab12"
    report = SimpleNamespace(objective=Objective("val/ndcg@10", "max"))
    assert replay_finished(cfg, report) is False and reported == []  # not completed: the trial trains

    run = tmp_path / "trial_ab12" / "s-ab12"
    run.mkdir(parents=True)
    final = {"epoch": 4, "best/val/ndcg@10": 0.41, "test/ndcg@10": 0.39}
    (run / FINAL_METRICS).write_text(json.dumps({"metrics": final, "checkpoint": str(run / "final")}))
    (run / RUN_DONE).write_text("mlflow-run-id")
    assert replay_finished(cfg, report) is True
    (got,) = reported
    assert is_final(got) and got["epoch"] == 4 and got["best/val/ndcg@10"] == 0.41
    assert got[CHECKPOINT_KEY] == str(run / "final")
    assert sorted(p.name for p in run.parent.iterdir()) == ["s-ab12"]
