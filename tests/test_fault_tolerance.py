"""Fault tolerance and the hardware guard.

Fast: mid-epoch checkpoints resume exactly, half-written checkpoints are never picked, a local
re-run after a crash continues the same run, jobs that can never be placed fail in seconds.
Slow (a real `ray start --head`): a Ray Train worker killed in epoch 2 and a driver killed mid-run
both resume, and end where an uninterrupted run with the same seed ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from rayrec import recipes
from rayrec.data.dataset import open_prepared
from rayrec.errors import ClusterError
from rayrec.tracking.mlflow_tracking import RUN_KEY_TAG, Tracker
from rayrec.train.checkpoint import STATE_FILE, latest_checkpoint, load_state, newest_readable, save_state
from rayrec.train.inputs import data_info
from rayrec.train.local import LocalReporter, run_local


class Crash(Exception):
    pass


def crash_after(match):
    """Patch ``LocalReporter.report`` to raise right after a report that ``match`` accepts."""
    orig = LocalReporter.report

    def report(self, metrics, state):
        orig(self, metrics, state)
        if match(metrics, state):
            raise Crash

    return orig, report


def crash_in(monkeypatch, match, run) -> None:
    """``run()`` with the local reporter raising ``Crash`` right after a report that ``match`` accepts."""
    orig, crashing = crash_after(match)
    monkeypatch.setattr(LocalReporter, "report", crashing)
    with pytest.raises(Crash):
        run()
    monkeypatch.setattr(LocalReporter, "report", orig)


def local(cfg, run_dir, resume_from=None):
    ds = open_prepared(cfg.data.path)
    return run_local(cfg, ds, data_info(ds, cfg), run_dir=run_dir, tracker=Tracker.null(), resume_from=resume_from)


# ----------------------------------------------------------------------------- checkpoints


def test_mid_epoch_checkpoints_resume_exactly(tiny_job, tmp_path, monkeypatch):
    """Crash 2 batches into epoch 2 (checkpoint every 4 steps): the resumed run skips the batches
    it already trained on and ends exactly where an uninterrupted run ends."""
    cfg = tiny_job.model_copy(deep=True)
    cfg.train.epochs = 2
    plain, _ = local(cfg, tmp_path / "plain")
    cfg.run.checkpoint.every_n_steps = 4  # 10 batches per epoch: steps 4, 8 | 12, 16, 20
    cfg.run.checkpoint.num_to_keep = None  # keep them all, to list them
    full, _ = local(cfg, tmp_path / "full")
    assert full["test/ndcg@10"] == plain["test/ndcg@10"]  # checkpointing does not disturb training
    names = sorted(p.name for p in (tmp_path / "full").iterdir())
    assert names == ["epoch_0001", "epoch_0001_step_0000004", "epoch_0001_step_0000008", "epoch_0002",
                     "epoch_0002_step_0000012", "epoch_0002_step_0000016", "epoch_0002_step_0000020", "final"]

    crash_in(monkeypatch, lambda m, s: m.get("mid_epoch_step") == 12, lambda: local(cfg, tmp_path / "cut"))
    ckpt = latest_checkpoint(tmp_path / "cut")
    state = load_state(ckpt)
    assert ckpt.name == "epoch_0002_step_0000012" and (state["epoch"], state["step"], state["epoch_batch"]) == (1, 12, 2)
    resumed, rep = local(cfg, tmp_path / "cut", resume_from=ckpt)
    assert [m["epoch"] for m in rep.metrics[:-1]] == [2]
    assert resumed["test/ndcg@10"] == pytest.approx(full["test/ndcg@10"], rel=1e-6)
    assert resumed["best/val/ndcg@10"] == pytest.approx(full["best/val/ndcg@10"], rel=1e-6)


def test_half_written_checkpoints_are_never_picked(tmp_path):
    good = {"epoch": 1, "w": torch.ones(3)}
    save_state(good, tmp_path / "epoch_0001")
    (tmp_path / "epoch_0002").mkdir()  # cut off while torch.save wrote its temp file
    (tmp_path / "epoch_0002" / f".{STATE_FILE}.tmp-123").write_bytes(b"PK\x03\x04 half")
    (tmp_path / "epoch_0003_step_0000500").mkdir()  # cut off before anything was written
    assert latest_checkpoint(tmp_path) == tmp_path / "epoch_0001"
    save_state(good, tmp_path / "epoch_0002_step_0000400")
    assert latest_checkpoint(tmp_path).name == "epoch_0002_step_0000400"
    save_state(good, tmp_path / "epoch_0002")
    assert latest_checkpoint(tmp_path).name == "epoch_0002"  # a finished epoch beats its own steps
    assert latest_checkpoint(tmp_path / "absent") is None


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    save_state({"epoch": 1}, tmp_path)

    def dies_midway(obj, f):
        f.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(OSError):
        save_state({"epoch": 2}, tmp_path)
    monkeypatch.undo()
    assert load_state(tmp_path)["epoch"] == 1


def test_rerun_after_a_crash_continues_the_same_run_and_mlflow_run(tiny_job, monkeypatch):
    """`rayrec train --local` again after a crash: same run folder, same MLflow run, epochs go on."""
    cfg = tiny_job.model_copy(deep=True)
    crash_in(monkeypatch, lambda m, s: m.get("epoch") == 2 and s is not None and "test/hr@10" not in m,
             lambda: recipes.run(cfg, local=True))
    out = recipes.run(cfg, local=True)
    assert out.run_dir.name == "t" and out.metrics["epoch"] == 3
    c = MlflowClient(cfg.tracking.uri)
    runs = c.search_runs([c.get_experiment_by_name("tests").experiment_id])
    assert [r.info.run_id for r in runs] == [out.mlflow_run_id] and runs[0].info.status == "FINISHED"
    assert [m.step for m in c.get_metric_history(out.mlflow_run_id, "train/loss")] == [1, 2, 3]
    assert [m.value for m in c.get_metric_history(out.mlflow_run_id, "resume/epoch")] == [2.0]


# ----------------------------------------------------------------------------- hardware guard


def test_gpus_on_a_cluster_without_them_fail_in_seconds(ray_session, tiny_job):
    cfg = tiny_job.model_copy(deep=True)
    cfg.scaling.use_gpu, cfg.scaling.num_workers = True, 2
    start = time.monotonic()
    with pytest.raises(ClusterError, match=r"needs 2 GPUs for 2 workers, the cluster has 0"):
        recipes.run(cfg)
    assert time.monotonic() - start < 30


def test_declared_autoscaler_limits_let_a_job_wait_for_nodes(ray_session, tiny_job, monkeypatch):
    from rayrec.cluster import preflight

    cfg = tiny_job.model_copy(deep=True)
    cfg.scaling.use_gpu, cfg.scaling.num_workers = True, 8
    cfg.scaling.resources_per_worker = {"CPU": 8, "GPU": 1}
    monkeypatch.setenv("RAYREC_MAX_RESOURCES", '{"CPU": 360, "GPU": 32}')
    preflight(cfg)  # 8 GPUs fit 4 x 8 once the autoscaler adds nodes
    cfg.scaling.num_workers = 40
    with pytest.raises(ClusterError, match="needs 40 GPUs for 40 workers, the cluster has 32"):
        preflight(cfg)
    monkeypatch.setenv("RAYREC_MAX_RESOURCES", "32 GPUs")
    with pytest.raises(ClusterError, match="RAYREC_MAX_RESOURCES"):
        preflight(cfg)


def test_relative_paths_go_under_the_clusters_storage_root(tiny_job, monkeypatch, tmp_path):
    from rayrec.cluster import shared_paths

    cfg = tiny_job.model_copy(deep=True)
    cfg.data.path, cfg.run.storage_path = Path("data/q"), Path("runs")
    assert shared_paths(cfg) is cfg  # unset: nothing changes
    monkeypatch.setenv("RAYREC_STORAGE_ROOT", str(tmp_path / "shared"))
    moved = shared_paths(cfg)
    assert moved.data.path == tmp_path / "shared" / "data/q" and moved.run.storage_path == tmp_path / "shared" / "runs"
    cfg.run.storage_path = tmp_path / "abs"
    assert shared_paths(cfg).run.storage_path == tmp_path / "abs"


def test_failure_config_maps_the_job(ray_session, tiny_job, tmp_path):
    from rayrec.recipes import sequential
    from rayrec.runs import Run, build_trainer

    cfg = tiny_job.model_copy(deep=True)
    cfg.run.max_failures, cfg.scaling.start_attempts = 3, 4
    run = Run(tmp_path / "runs" / "x", local=False)
    parts = sequential.RECIPE.trainer(cfg, sequential.RECIPE.prepare(cfg, run), run)
    trainer = build_trainer(cfg, parts, run_dir=run.dir)
    fc = trainer.run_config.failure_config
    assert (fc.max_failures, fc.controller_failure_limit) == (3, 3)
    assert trainer.run_config.name == "x" and trainer.run_config.storage_path == str(tmp_path / "runs")


# ----------------------------------------------------------------------------- real cluster (slow)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A real Ray head on 127.0.0.1 with the dashboard (the state API finds worker PIDs)."""
    from local_ray import LocalHead, raise_interrupt_on_sigterm

    previous = raise_interrupt_on_sigterm()
    h = LocalHead(num_cpus=3)
    try:
        yield h.start()
    finally:
        h.stop()
        signal.signal(signal.SIGTERM, previous)


def start_driver(head, job: Path, log: Path) -> subprocess.Popen:
    """`rayrec train JOB` as a separate driver process joining the test head."""
    from local_ray import BIN

    return subprocess.Popen([str(BIN / "rayrec"), "train", str(job), "--json", str(job.with_suffix(".json"))],
                            env=head.env(RAY_ADDRESS=head.gcs_address), stdout=log.open("ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 1800) -> dict:
    assert proc.wait(timeout=timeout) == 0, log.read_text()[-6000:]
    return json.loads(Path(proc.args[-1]).read_text())


def latest_registered(run_dir: Path) -> dict:
    """Ray Train's newest complete checkpoint of a run: ``{"name": ..., "metrics": {...}}`` or {}."""
    try:
        latest = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["latest_checkpoint_result"]
    except (FileNotFoundError, ValueError, KeyError, TypeError):  # absent, or being rewritten
        return {}
    return {"name": latest["checkpoint_dir_name"], "metrics": latest["metrics"]} if latest else {}


def wait_for_checkpoint(run_dir: Path, prefix: str, proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    """Until Ray Train's newest registered checkpoint is named ``prefix...``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if latest_registered(run_dir).get("name", "").startswith(prefix):
            return
        assert proc.poll() is None, f"driver ended early:\n{log.read_text()[-6000:]}"
        time.sleep(0.1)
    raise TimeoutError(f"no {prefix} checkpoint after {timeout} s:\n{log.read_text()[-6000:]}")


def alive(head, class_name: str, attempts: int = 5) -> list:
    """Live actors of a class, from Ray's state API (the dashboard); retried while it is busy."""
    from ray.util.state import list_actors
    from ray.util.state.exception import RayStateApiException

    for attempt in range(attempts):
        head.check()
        try:
            return list_actors(address=head.dashboard, timeout=60, raise_on_missing_output=False,
                               filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")])
        except RayStateApiException:
            if attempt == attempts - 1:
                raise
            time.sleep(2)
    return []


def mlflow_run(job_dir: Path, run_dir: Path):
    c = MlflowClient(f"sqlite:///{job_dir}/mlflow.db")
    exp = c.get_experiment_by_name("ft")
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_dir}'")
    return c, runs


@pytest.fixture(scope="module")
def reference(head, ft_job):
    """The uninterrupted run both fault tests must match."""
    job = ft_job("reference")
    log = job.with_suffix(".log")
    return finish(start_driver(head, job, log), log)


@pytest.mark.slow
def test_killed_worker_resumes_from_the_epoch_1_checkpoint(head, ft_job, reference):
    """SIGKILL the Ray Train worker (PID from Ray's state API) once epoch 1's checkpoint is in:
    Ray Train starts a new worker, which resumes from that checkpoint and ends as the reference."""
    job = ft_job("worker_kill")
    log, run_dir = job.with_suffix(".log"), ft_job.work / "runs" / "worker_kill"
    proc = start_driver(head, job, log)
    deadline = time.monotonic() + 600
    while not (workers := alive(head, "RayTrainWorker")) and time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-6000:]
        time.sleep(0.5)
    (worker,) = workers  # known before epoch 1 ends, so the kill follows its checkpoint at once
    wait_for_checkpoint(run_dir, "epoch_0001", proc, log)
    os.kill(worker.pid, signal.SIGKILL)
    assert latest_registered(run_dir)["name"] == "epoch_0001", "the kill came after epoch 2 ended"
    out = finish(proc, log)

    c, (run,) = mlflow_run(ft_job.work, run_dir)
    assert [m.value for m in c.get_metric_history(run.info.run_id, "resume/epoch")] == [1.0]
    assert run.info.status == "FINISHED" and out["epoch"] == 4
    assert out["best/val/ndcg@10"] == pytest.approx(reference["best/val/ndcg@10"], abs=1e-6)
    assert out["test/ndcg@10"] == pytest.approx(reference["test/ndcg@10"], abs=1e-6)


@pytest.mark.slow
def test_killed_driver_rerun_resumes_the_same_run(head, ft_job, reference):
    """SIGKILL the driver inside epoch 2 (checkpoints every 5 steps), run the same command again:
    same run folder, one MLflow run whose epochs continue, the reference's final metrics."""
    job = ft_job("driver_kill", checkpoint={"every_n_steps": 5})
    log, run_dir = job.with_suffix(".log"), ft_job.work / "runs" / "driver_kill"
    proc = start_driver(head, job, log)
    wait_for_checkpoint(run_dir, "epoch_0002_step_", proc, log)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 180
    while (alive(head, "RayTrainWorker") or alive(head, "TrainController")) and time.monotonic() < deadline:
        time.sleep(1)  # Ray ends the actors of a dead driver; until then they may still checkpoint
    # the newest complete checkpoint on disk: it may be newer than the one Ray had registered when the driver
    # died (reported, written, not yet in Ray's snapshot); the re-run resumes from it
    newest = newest_readable(run_dir)
    epoch, _, step = newest.name.removeprefix("epoch_").partition("_step_")
    resume_point = {"epoch": int(epoch), **({"mid_epoch_step": int(step)} if step else {})}
    for name in ("epoch_0003", "epoch_0004_step_0000070"):  # debris of a crash mid-write: never resumed from
        (run_dir / name).mkdir(exist_ok=True)
        (run_dir / name / STATE_FILE).write_bytes(b"PK\x03\x04 truncated")

    out = finish(start_driver(head, job, log), log)
    assert not (ft_job.work / "runs" / "driver_kill_v2").exists()
    c, runs = mlflow_run(ft_job.work, run_dir)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    rid = runs[0].info.run_id
    resumed = {k: [m.value for m in c.get_metric_history(rid, f"resume/{k}")] for k in ("epoch", "step")}
    if "mid_epoch_step" in resume_point:  # the usual case: a step checkpoint of epoch 2
        assert resumed == {"epoch": [resume_point["epoch"] - 1], "step": [resume_point["mid_epoch_step"]]}
    else:  # the driver died after epoch 2 ended
        assert resumed["epoch"] == [resume_point["epoch"]]
    assert sorted({m.step for m in c.get_metric_history(rid, "train/loss")}) == [1, 2, 3, 4]
    assert out["best/val/ndcg@10"] == pytest.approx(reference["best/val/ndcg@10"], abs=1e-6)
    assert out["test/ndcg@10"] == pytest.approx(reference["test/ndcg@10"], abs=1e-6)
