"""Real sweeps on the session's Ray (2 CPUs, with the dashboard): trials are Ray Train runs
nested in Tune, recorded as MLflow child runs; a crashing trial is recorded as failed while
the sweep goes on; an interrupted sweep resumes without repeating finished trials."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from rayrec.cli import main
from rayrec.config import dump_job, load_job
from rayrec.data.features import FEATURES_FILE
from rayrec.tune.runner import COMPLETE_MARKER, run_sweep
from rayrec.tune.space import OptunaSpace, load_space


def write_space(tmp_path: Path, job, **fields) -> Path:
    (tmp_path / "job.yaml").write_text(dump_job(job))
    space = {"job": "job.yaml", "metric": "val/ndcg@10", "max_concurrent_trials": 2,
             "trial": {"num_workers": 1, "resources_per_worker": {"CPU": 0.25}, "driver_cpu": 0.25},
             "storage_path": str(tmp_path / "tune"), **fields}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def children(uri: str, experiment: str, parent_id: str) -> list:
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    return c.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")


def expected_failures(sweep, n: int) -> int:
    """How many of the first ``n`` random draws are (hidden 16, 3 heads), which cannot be built."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=sweep.space.searcher.seed))
    space = OptunaSpace(sweep.space.params, sweep.order)
    draws = [space(study.ask()) for _ in range(n)]
    return sum(d["model.hidden"] == 16 and d["model.num_heads"] == 3 for d in draws)


@pytest.mark.slow
def test_asha_sweep_records_trials_and_exports_a_runnable_best_job(ray_session, tiny_job, tmp_path, capsys):
    params = {"model.hidden": {"dist": "choice", "values": [16, 24]},
              "model.num_heads": {"dist": "choice", "values": [1, 3]},  # 16 % 3: a trial that crashes
              "model.dropout": {"dist": "uniform", "low": 0.0, "high": 0.3}}
    space = write_space(tmp_path, tiny_job, params=params, overrides=["model.hidden=24"], num_samples=4,
                        searcher={"name": "random", "seed": 4},
                        scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 2})
    sweep = load_space(space)
    failing = expected_failures(sweep, 4)
    assert failing == 1

    out = run_sweep(sweep)
    assert not out.interrupted and (out.sweep_dir / COMPLETE_MARKER).exists()
    statuses = sorted(r.status for r in out.rows)
    assert len(out.rows) == 4 and statuses.count("failed") == failing
    assert "completed" in statuses and set(statuses) <= {"completed", "stopped_early", "failed"}

    uri, experiment = tiny_job.tracking.uri, tiny_job.tracking.experiment
    c = MlflowClient(uri)
    parent = c.get_run(out.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["rayrec.kind"] == "sweep"
    assert parent.data.metrics["trials/failed"] == failing
    assert {a.path for a in c.list_artifacts(parent.info.run_id, "sweep")} >= {
        "sweep/best.yaml", "sweep/results.csv", "sweep/summary.csv", "sweep/space.yaml", "sweep/base_job.yaml"}

    kids = children(uri, experiment, out.parent_run_id)
    assert len(kids) == 4
    by_status = {}
    for run in kids:
        by_status.setdefault(run.data.tags["rayrec.trial_status"], []).append(run)
        assert set(run.data.params) <= set(params) and run.data.tags["rayrec.base_job"].endswith("job.yaml")
    failed = by_status["failed"][0]
    assert failed.info.status == "FAILED" and "divisible by num_heads" in failed.data.tags["rayrec.error"]
    done = by_status["completed"][0]
    assert done.info.status == "FINISHED" and set(done.data.params) == set(params)
    assert [m.step for m in c.get_metric_history(done.info.run_id, "val/ndcg_at_10")] == [1, 2, 3]
    assert "test/ndcg_at_10" in done.data.metrics and done.data.tags["rayrec.checkpoint"].endswith("final")
    for run in by_status.get("stopped_early", []):
        assert run.info.status == "KILLED"
    # ASHA stopped them at a rung (the epochs Tune saw); a worker may have trained on for the second
    # the stop takes to arrive (with in-memory data a tiny epoch takes well under a second)
    assert all(r.epochs < 3 for r in out.rows if r.status == "stopped_early")

    # the best trial's config is a job file that `rayrec train` accepts, with the best values
    best = load_job(out.best_job)
    assert best.model.dropout == pytest.approx(out.best.params["model.dropout"])
    assert best.model.hidden == out.best.params["model.hidden"] and best.train.early_stopping.metric == "val/ndcg@10"
    assert out.best.value == max(r.value for r in out.rows if r.value is not None)
    # export.name: the best trial's model is registered (what `rayrec tune` does at the end)
    from rayrec.cli.recs import export_at_end
    from rayrec.config.schema import ExportConfig

    export_at_end(out.best.checkpoint, sweep.job.model_copy(update={"export": ExportConfig(name="best", alias="top")}))
    version = c.get_model_version_by_alias("best", "top")
    assert c.get_run(version.run_id).data.tags["rayrec.export.checkpoint"].startswith(out.best.checkpoint)
    # Tune's dataframe has a row per trial that reported (the crashed one never did); the summary has all
    assert len(pd.read_csv(out.sweep_dir / "results.csv")) == 4 - failing
    assert sorted(pd.read_csv(out.sweep_dir / "summary.csv")["status"]) == statuses

    # compare and diagnose read the trials back
    assert main(["compare", experiment, "--tracking-uri", uri, "--sweep", "space", "--out", str(tmp_path / "cmp")]) == 0
    assert main(["diagnose", done.info.run_id, "--tracking-uri", uri, "--out", str(tmp_path / "diag")]) == 0
    printed = capsys.readouterr().out
    assert f"{experiment}: 4 runs by best val/ndcg@10 (max)" in printed and "failed" in printed
    assert f"run {done.info.run_id}" in printed and (tmp_path / "cmp" / "parallel_coordinates.png").exists()


def interrupt_after_first_completed(uri: str, experiment: str, timeout: float = 900) -> threading.Thread:
    """Send this process SIGINT (Ctrl-C) once the first trial is recorded as completed."""
    def watch() -> None:
        c, deadline = MlflowClient(uri), time.time() + timeout
        while time.time() < deadline:
            exp = c.get_experiment_by_name(experiment)
            if exp and c.search_runs([exp.experiment_id], "tags.`rayrec.trial_status` = 'completed'"):
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.5)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_repeating_finished_trials(ray_session, tiny_job, tmp_path):
    cfg = tiny_job.model_copy(deep=True)
    cfg.train.epochs = 2
    space = write_space(tmp_path, cfg, params={"model.dropout": {"dist": "uniform", "low": 0.0, "high": 0.3}},
                        num_samples=3, max_concurrent_trials=1, scheduler={"name": "none"})
    uri, experiment = cfg.tracking.uri, cfg.tracking.experiment

    interrupt_after_first_completed(uri, experiment)
    first = run_sweep(load_space(space))
    assert first.interrupted and not (first.sweep_dir / COMPLETE_MARKER).exists()
    c = MlflowClient(uri)
    assert c.get_run(first.parent_run_id).info.status == "KILLED"
    finished = [r for r in first.rows if r.status == "completed"]
    assert finished and (len(first.rows) < 3 or any(r.status not in ("completed", "failed") for r in first.rows))
    progress = {r.trial_id: (first.sweep_dir / f"trial_{r.trial_id}" / "result.json").read_text() for r in finished}

    second = run_sweep(load_space(space), resume=True)
    assert not second.interrupted and second.parent_run_id == first.parent_run_id
    assert c.get_run(second.parent_run_id).info.status == "FINISHED"
    assert sorted(r.status for r in second.rows) == ["completed"] * 3
    kids = children(uri, experiment, second.parent_run_id)
    assert sorted(k.data.tags["rayrec.trial_id"] for k in kids) == sorted(r.trial_id for r in second.rows)
    for trial_id, before in progress.items():  # finished trials were kept, not run again
        assert (second.sweep_dir / f"trial_{trial_id}" / "result.json").read_text() == before
        kid = next(k for k in kids if k.data.tags["rayrec.trial_id"] == trial_id)
        assert [m.step for m in c.get_metric_history(kid.info.run_id, "val/ndcg_at_10")] == [1, 2]


UR4REC_STAGES = ("[{name: joint_finetune, epochs: 1, lr: {sasrec: 0.002, retriever: 0.002},"  # what the space searches
                 " strategies: [{name: adaptive_alternating, window: 1, min_steps: 2, max_steps: 12},"
                 " {name: distillation}]}]")


@pytest.mark.slow
def test_ur4rec_switch_sweep_runs_from_a_folder_with_no_data_and_no_features(ray_session, tmp_path, monkeypatch,
                                                                             capsys):
    """The shipped space on a fresh folder: the sweep prepares the data and the features once, then every
    trial runs the joint recipe through the driver (shrunk by overrides to seconds an epoch)."""
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    data, cache = tmp_path / "data", tmp_path / "cache"
    overrides = [
        "num_samples=2", "scheduler.name=none", f"storage_path={tmp_path}/tune",
        f"data.path={data}", "data.synth={users: 200, items: 80, topics: 4, mean_len: 15, images: true}",
        "model.sasrec.hidden=16", "model.sasrec.num_blocks=1", "model.sasrec.max_len=15",
        "model.retriever.hidden=16", "model.retriever.num_negatives=7", "model.fusion.top_n=30",
        "model.features.text_model=hash:32", f"model.features.cache_dir={cache}", f"model.stages={UR4REC_STAGES}",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
    ]
    assert not data.exists() and not cache.exists()
    assert main(["tune", str(root / "search_spaces" / "ur4rec_switch.yaml"), *overrides]) == 0
    printed = capsys.readouterr().out
    assert "2 completed" in printed and printed.splitlines()[-1].startswith("log:")
    log = Path(printed.splitlines()[-1].split()[1]).read_text()
    assert log.count(f"features -> {data / 'features'}") == 1  # computed once, on the sweep's driver
    driver_manifest = json.loads((data / "features" / FEATURES_FILE).read_text())
    assert driver_manifest["computed"]["item_text"] == 80
    c = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    kids = c.search_runs([c.get_experiment_by_name("ur4rec_quickstart").experiment_id], "tags.`rayrec.kind` = 'trial'")
    assert len(kids) == 2 and all(k.data.tags["rayrec.trial_status"] == "completed" for k in kids)
    assert all(k.data.tags["rayrec.checkpoint"].endswith("final") for k in kids)
    for kid in kids:  # each trial used the driver's features (a recomputation would hit the cache: computed 0)
        dst = tmp_path / "artifacts" / kid.info.run_id
        dst.mkdir(parents=True)
        got = Path(c.download_artifacts(kid.info.run_id, "data/features.json", str(dst)))
        assert json.loads(got.read_text()) == driver_manifest
