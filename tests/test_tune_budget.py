"""The epoch budget: a sweep stops once its trials have trained that many epochs in all."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import pandas as pd
import pytest

from rayrec.tune.budget import EpochBudget, trial_epochs
from rayrec.tune.runner import run_sweep
from rayrec.tune.space import load_space
from tests.test_tune_sweep import children, write_space


def test_the_budget_counts_epoch_reports_of_every_trial_and_stops_the_sweep_at_it():
    stop = EpochBudget(5)
    for epoch in (1, 2, 3):
        assert stop("a", {"epoch": epoch, "val/ndcg@10": 0.1}) is False  # never stops one trial
    assert not stop.stop_all()
    stop("a", {"epoch": 3, "test/ndcg@10": 0.1})  # the final test report repeats epoch 3: not an epoch
    stop("b", {"epoch": 1})
    assert stop.spent == 4 and not stop.stop_all()
    stop("b", {"epoch": 2})
    assert stop.spent == 5 and stop.stop_all()


def test_the_budget_records_what_it_counted_so_the_summary_agrees_after_a_resume(tmp_path):
    """Epochs a resumed trial trains again, or whose results were lost, count against the budget but are
    missing from the saved results: the end of the sweep must be judged by the stopper's own count."""
    from rayrec.tune.budget import recorded_spent

    assert recorded_spent(tmp_path) is None  # no budget file: nothing recorded
    stop = EpochBudget(3, record=tmp_path)
    stop("a", {"epoch": 1})
    assert recorded_spent(tmp_path) == 1
    resumed = pickle.loads(pickle.dumps(stop))  # what Tune.restore gives back
    resumed("a", {"epoch": 1})  # trained again after the resume
    resumed("b", {"epoch": 1})
    assert resumed.stop_all() and recorded_spent(tmp_path) == 3


def test_trial_epochs_are_read_back_from_the_results_without_the_test_report():
    frame = pd.DataFrame({"epoch": [1, 2, 3, 3], "val/ndcg@10": [0.1, 0.2, 0.3, None],
                          "test/ndcg@10": [None, None, None, 0.25]})
    results = [SimpleNamespace(metrics={"trial_id": "a"}, metrics_dataframe=frame),
               SimpleNamespace(metrics={"trial_id": "b"}, metrics_dataframe=pd.DataFrame({"epoch": [1, 2]})),
               SimpleNamespace(metrics={}, metrics_dataframe=None)]  # a trial that never reported
    assert trial_epochs(results) == {"a": 3, "b": 2}


def test_runs_left_running_when_a_budget_ends_the_sweep_are_closed_as_stopped(tmp_path):
    from mlflow.tracking import MlflowClient

    from rayrec.tune.mlflow_sweep import PARENT_TAG, STATUS_TAG, TRIAL_TAG, close_open_children

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    exp = c.create_experiment("e")
    parent = c.create_run(exp).info.run_id
    done = c.create_run(exp, tags={PARENT_TAG: parent, TRIAL_TAG: "a"}).info.run_id
    c.set_terminated(done, "FINISHED")
    left = c.create_run(exp, tags={PARENT_TAG: parent, TRIAL_TAG: "b"}).info.run_id
    other = c.create_run(exp, tags={TRIAL_TAG: "c"}).info.run_id  # not this sweep's

    assert close_open_children(uri, "e", parent, "epoch budget") == ["b"]
    run = c.get_run(left)
    assert run.info.status == "KILLED" and run.data.tags[STATUS_TAG] == "stopped_early"
    assert run.data.tags["rayrec.stopped_by"] == "epoch budget"
    assert c.get_run(done).info.status == "FINISHED" and c.get_run(other).info.status == "RUNNING"


def test_a_budget_must_be_a_positive_number_of_trial_epochs(tiny_job, tmp_path):
    from rayrec.errors import ConfigError

    params = {"model.dropout": {"dist": "uniform", "low": 0.0, "high": 0.3}}
    with pytest.raises(ConfigError, match="epoch_budget"):
        load_space(write_space(tmp_path, tiny_job, params=params, num_samples=2, epoch_budget=0))


@pytest.mark.slow
def test_a_sweep_ends_at_its_epoch_budget_not_at_num_samples(ray_session, tiny_job, tmp_path, capsys):
    params = {"model.dropout": {"dist": "uniform", "low": 0.0, "high": 0.3}}
    space = write_space(tmp_path, tiny_job, params=params, num_samples=6, max_concurrent_trials=1, epoch_budget=5,
                        searcher={"name": "random", "seed": 0}, scheduler={"name": "none"})
    sweep = load_space(space)
    assert sweep.max_epochs == 3

    out = run_sweep(sweep)
    trained = sum(r.trained for r in out.rows)
    # one trial at a time: 3 epochs, then 2 of the next (a report in flight may add one)
    assert 5 <= trained <= 6 and len(out.rows) < 6
    assert not out.interrupted  # spending the budget is how this sweep ends, not an interruption
    assert out.best is not None and out.best_job is not None
    # the trial Tune stopped at the budget is recorded, not left RUNNING in MLflow
    runs = children(tiny_job.tracking.uri, tiny_job.tracking.experiment, out.parent_run_id)
    assert runs and all(r.info.status != "RUNNING" for r in runs)
    assert any(r.data.tags.get("rayrec.stopped_by") == "epoch budget" for r in runs)
