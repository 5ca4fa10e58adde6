"""Several Ray nodes on this host (issue 28): every node must see the run's storage and data.

The nodes are `ray start --address` processes (``local_ray.WorkerNode``) with their own temp dirs and
ports; a node started in its own mount namespace with a tmpfs over the runs folder sees other files
there than the driver, as a head-local disk looks from another machine.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import sys, ray
from rayrec.cluster import check_shared_storage
from rayrec.config.kinds import load_job_file
ray.init(address=sys.argv[1], logging_level="ERROR")
check_shared_storage(load_job_file(sys.argv[2], sys.argv[3:]))
print("every node sees the same files")
"""


@pytest.mark.slow
def test_a_node_that_sees_other_files_fails_the_preflight_naming_it(tiny_dataset, tmp_path):
    from local_ray import BIN, LocalHead, WorkerNode, raise_interrupt_on_sigterm

    raise_interrupt_on_sigterm()
    runs = tmp_path / "runs"
    runs.mkdir()
    overrides = [f"data.path={tiny_dataset}", "data.prepare_if_missing=false", f"run.storage_path={runs}",
                 "run.name=blind", "tracking.enabled=false", "train.epochs=1", "model.hidden=16", "model.max_len=20",
                 "train.eval.ks=[5,10]", "scaling.num_workers=2", "scaling.resources_per_worker={CPU: 0.5}"]
    job = ROOT / "jobs" / "quickstart.yaml"
    head = LocalHead(num_cpus=2).start()
    nodes = []
    try:
        nodes.append(WorkerNode(head, 1, {"node_b": 1}, private_tmpfs=runs).start())
        env = head.env(RAY_ADDRESS=head.gcs_address)
        done = subprocess.run([str(BIN / "rayrec"), "train", str(job), *overrides], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr[-3000:]
        said = done.stderr.strip().splitlines()[-1]
        assert re.search(rf"node \S+ [0-9a-f]{{8}} does not see the files of run.storage_path = {runs} ", said), said
        assert not list(runs.rglob(".rayrec-shared-*"))  # the markers are removed
        nodes.pop().stop()
        nodes.append(WorkerNode(head, 1, {"node_c": 1}).start())  # a node of the same disk
        ok = subprocess.run([sys.executable, "-c", CHECK, head.gcs_address, str(job), *overrides], env=env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert ok.returncode == 0 and "every node sees the same files" in ok.stdout, ok.stderr[-3000:]
    finally:
        for node in nodes:
            node.stop()
        head.stop()


def holds_store(pid: int, store: Path) -> bool:
    """Whether the process has ``store`` open: rank 0's tracker keeps the sqlite MLflow store open."""
    import psutil

    try:
        return any(Path(f.path) == store for f in psutil.Process(pid).open_files())
    except psutil.Error:
        return False


@pytest.mark.slow
def test_losing_the_node_of_rank_1_resumes_on_a_replacement_node_as_if_never_lost(tmp_path):
    """2 DDP workers on 2 worker nodes (one `slot` each); once epoch 1's checkpoint is in, SIGKILL the node of
    rank 1; a replacement node joins; Ray Train restarts the group from that checkpoint and the run ends with
    the uninterrupted run's metrics, one MLflow run, FINISHED. The head's health checks are short (test only)."""
    import json
    import time

    import psutil
    from conftest import _synth
    from local_ray import LocalHead, WorkerNode, raise_interrupt_on_sigterm
    from test_fault_tolerance import (
        alive,
        finish,
        latest_registered,
        mlflow_run,
        start_driver,
        wait_for_checkpoint,
    )

    from rayrec.config import dump_job
    from rayrec.config.schema import JobConfig

    raise_interrupt_on_sigterm()
    data = _synth(tmp_path / "data", users=900, items=150, mean_len=20)

    def job(name: str) -> Path:
        cfg = JobConfig.model_validate({
            "data": {"path": str(data), "prepare_if_missing": False},
            "model": {"name": "sasrec", "hidden": 16, "num_blocks": 1, "dropout": 0.1, "max_len": 20},
            "train": {"epochs": 4, "batch_size": 32, "optim": {"lr": 0.005}, "shuffle_buffer": 128,
                      "early_stopping": {"patience": 10}, "eval": {"ks": [10], "batch_size": 256}},
            "scaling": {"num_workers": 2, "resources_per_worker": {"CPU": 0.5, "slot": 1}},
            "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "ft"},
            "run": {"name": name, "storage_path": str(tmp_path / "runs"), "seed": 0, "max_failures": 2},
        })
        path = tmp_path / f"{name}.yaml"
        path.write_text(dump_job(cfg))
        return path

    fast = {"RAY_health_check_period_ms": "500", "RAY_health_check_timeout_ms": "1000",
            "RAY_health_check_failure_threshold": "3"}
    head = LocalHead(num_cpus=1, env=fast).start()
    nodes = []
    try:
        nodes += [WorkerNode(head, 1, {"slot": 1}).start(), WorkerNode(head, 1, {"slot": 1}).start()]
        ref_job = job("reference")
        start = time.monotonic()
        reference = finish(start_driver(head, ref_job, ref_job.with_suffix(".log")), ref_job.with_suffix(".log"))
        reference_s = time.monotonic() - start

        lost = job("node_lost")
        log, run_dir = lost.with_suffix(".log"), tmp_path / "runs" / "node_lost"
        start = time.monotonic()
        proc = start_driver(head, lost, log)
        deadline = time.monotonic() + 600
        while len(workers := alive(head, "RayTrainWorker")) < 2 and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-6000:]
            time.sleep(0.5)
        wait_for_checkpoint(run_dir, "epoch_0001", proc, log)
        (rank1,) = [w.pid for w in workers if not holds_store(w.pid, tmp_path / "mlflow.db")]  # rank 0 logs
        (victim,) = [n for n in nodes if rank1 in {p.pid for p in n._processes(psutil)}]
        victim.kill()
        at_kill = latest_registered(run_dir)["name"]
        nodes.remove(victim)
        nodes.append(WorkerNode(head, 1, {"slot": 1}).start())  # the replacement
        out = finish(proc, log)
        lost_s = time.monotonic() - start
    finally:
        for node in nodes:
            node.stop()
        head.stop()

    c, (run,) = mlflow_run(tmp_path, run_dir)
    resumed = [m.value for m in c.get_metric_history(run.info.run_id, "resume/epoch")]
    report = {"killed_after": at_kill, "resumed_from_epoch": resumed, "reference_s": round(reference_s, 1),
              "node_lost_s": round(lost_s, 1), "test/ndcg@10": out["test/ndcg@10"],
              "reference test/ndcg@10": reference["test/ndcg@10"]}
    print(json.dumps(report))
    assert at_kill == "epoch_0001", f"the kill came after epoch 2 ended: {report}"
    assert resumed == [1.0] and run.info.status == "FINISHED" and out["epoch"] == 4, report
    assert out["best/val/ndcg@10"] == pytest.approx(reference["best/val/ndcg@10"], abs=1e-6), report
    assert out["test/ndcg@10"] == pytest.approx(reference["test/ndcg@10"], abs=1e-6), report


def trial_runs(sweep_dir: Path) -> dict[str, Path]:
    """trial id -> its rayrec run folder (``trial_ID/SWEEP-ID``), for the trials started so far."""
    return {d.parent.name.removeprefix("trial_"): d for d in sweep_dir.glob("trial_*/*-*") if d.is_dir()}


def newest_epoch(run: Path) -> int:
    done = [int(p.parent.name.split("_")[1]) for p in run.glob("epoch_*/state.pt") if "_step_" not in p.parent.name]
    return max(done, default=0)


@pytest.mark.slow
def test_a_sweep_survives_losing_a_trials_node_and_its_own_driver(tmp_path):
    """A 2-trial sweep whose trial drivers sit on 2 worker nodes (a `trial_slot` each). After a trial's epoch-1
    checkpoint, SIGKILL one node: Tune starts that trial again (trial.max_failures) on a replacement node,
    where its run resumes from its newest checkpoint. Then SIGKILL the sweep's driver; `rayrec tune --resume`
    ends every trial, with one MLflow child run per trial and the uninterrupted sweep's best config."""
    import json
    import os
    import signal
    import time

    import psutil
    import yaml
    from conftest import _synth
    from local_ray import BIN, LocalHead, WorkerNode, raise_interrupt_on_sigterm
    from mlflow.tracking import MlflowClient
    from test_fault_tolerance import alive

    from rayrec.config import dump_job
    from rayrec.config.schema import JobConfig

    raise_interrupt_on_sigterm()
    data = _synth(tmp_path / "data", users=600, items=150, mean_len=20)
    (tmp_path / "job.yaml").write_text(dump_job(JobConfig.model_validate({
        "data": {"path": str(data), "prepare_if_missing": False},
        "model": {"name": "sasrec", "hidden": 16, "num_blocks": 1, "max_len": 20},
        "train": {"epochs": 4, "batch_size": 32, "optim": {"lr": 0.005}, "shuffle_buffer": 128,
                  "early_stopping": {"patience": 10}, "eval": {"ks": [10], "batch_size": 256}},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "sweeps"},
        "run": {"storage_path": str(tmp_path / "runs"), "seed": 0, "max_failures": 2}})))
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({
        "job": "job.yaml", "metric": "val/ndcg@10", "num_samples": 2, "max_concurrent_trials": 2,
        "params": {"model.dropout": {"dist": "uniform", "low": 0.0, "high": 0.4}},
        "trial": {"num_workers": 1, "resources_per_worker": {"CPU": 0.25}, "driver_cpu": 0.25,
                  "driver_resources": {"trial_slot": 1}},
        "searcher": {"name": "random", "seed": 0}, "scheduler": {"name": "none"},
        "storage_path": str(tmp_path / "tune")}, sort_keys=False))
    fast = {"RAY_health_check_period_ms": "500", "RAY_health_check_timeout_ms": "1000",
            "RAY_health_check_failure_threshold": "3"}
    head = LocalHead(num_cpus=1, env=fast).start()
    nodes: list = []

    def tune(*args: str, **kw) -> subprocess.Popen:
        return subprocess.Popen([str(BIN / "rayrec"), "tune", str(tmp_path / "space.yaml"), *args],
                                env=head.env(RAY_ADDRESS=head.gcs_address), cwd=tmp_path, start_new_session=True,
                                stdout=open(tmp_path / f"{args[0].split('=')[1]}.log", "ab"), stderr=subprocess.STDOUT)

    def log(name: str) -> str:
        return (tmp_path / f"{name}.log").read_text()[-5000:]

    def resumes(trial: str) -> list[float]:
        """The epochs a trial's run resumed from so far (its MLflow child's resume/epoch)."""
        c = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
        exp = c.get_experiment_by_name("sweeps")
        kids = c.search_runs([exp.experiment_id], f"tags.`rayrec.trial_id` = '{trial}'") if exp else []
        return [m.value for k in kids for m in c.get_metric_history(k.info.run_id, "resume/epoch")]

    try:
        nodes += [WorkerNode(head, 1, {"trial_slot": 1}).start(), WorkerNode(head, 1, {"trial_slot": 1}).start()]
        start = time.monotonic()
        assert tune("name=reference").wait(900) == 0, log("reference")
        reference_s = time.monotonic() - start

        start = time.monotonic()
        proc, sweep_dir = tune("name=lossy"), tmp_path / "tune" / "lossy"
        deadline = time.monotonic() + 600
        while True:  # a node whose trial driver (it holds its run's lock) has a checkpoint
            assert proc.poll() is None and time.monotonic() < deadline, log("lossy")
            held = {n: {Path(f.path).parent for p in n._processes(psutil) for f in _open_files(p)
                        if f.path.endswith(".rayrec.lock")} for n in nodes}
            ready = [(n, run) for n, runs in held.items() for run in runs if 1 <= newest_epoch(run) < 3]
            if ready:
                break
            time.sleep(0.2)
        victim, held = ready[0]
        lost_trial = held.parent.name.removeprefix("trial_")
        victim.kill()
        at_kill = newest_epoch(held)  # its workers may sit on the other node: the retry resumes from this or newer
        nodes.remove(victim)
        nodes.append(WorkerNode(head, 1, {"trial_slot": 1}).start())  # the replacement
        while not (first := resumes(lost_trial)):  # Tune started the trial again and its run resumed
            assert proc.poll() is None and time.monotonic() < deadline, log("lossy")
            time.sleep(0.5)
        while newest_epoch(held) <= first[0] and newest_epoch(held) < 4:  # it trains on
            assert proc.poll() is None and time.monotonic() < deadline, log("lossy")
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)  # now the sweep's driver
        proc.wait()
        while alive(head, "RayTrainWorker") and time.monotonic() < deadline:
            time.sleep(1)  # Ray ends the trials of a dead driver
        killed_at = {t: newest_epoch(r) for t, r in trial_runs(sweep_dir).items()}
        assert tune("name=lossy", "--resume").wait(900) == 0, log("lossy")
        lossy_s = time.monotonic() - start
    finally:
        for node in nodes:
            node.stop()
        head.stop()

    c = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = c.get_experiment_by_name("sweeps")

    def sweep_runs(name: str):
        (parent,) = c.search_runs([exp.experiment_id], f"tags.`rayrec.run_dir` = '{tmp_path / 'tune' / name}'")
        kids = c.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        return parent, kids

    def summary(name: str) -> list[dict]:
        import pandas as pd

        return pd.read_csv(tmp_path / "tune" / name / "summary.csv").to_dict("records")

    parent, kids = sweep_runs("lossy")
    resumed = {k.data.tags["rayrec.trial_id"]: [m.value for m in c.get_metric_history(k.info.run_id, "resume/epoch")]
               for k in kids}
    report = {"lost_trial": lost_trial, "newest_at_loss": at_kill, "driver_killed_at_epochs": killed_at,
              "resume/epoch per trial": resumed, "reference_s": round(reference_s, 1), "lossy_s": round(lossy_s, 1),
              "reference": summary("reference"), "lossy": summary("lossy")}
    print(json.dumps(report, default=str))
    assert parent.info.status == "FINISHED", report
    assert sorted(k.data.tags["rayrec.trial_id"] for k in kids) == sorted(trial_runs(sweep_dir)), report  # no duplicate
    assert [k.info.status for k in kids] == ["FINISHED"] * 2, report
    assert not list(sweep_dir.glob("trial_*/*_v2")), report  # a trial that had ended is not trained again
    assert resumed[lost_trial][0] >= max(at_kill, 1), report  # the retried trial resumed from its checkpoint
    for trial, epoch in killed_at.items():  # and after the sweep driver's loss, from where each trial was
        if 1 <= epoch < 4:
            assert resumed[trial][-1] == epoch, report
    assert [r["status"] for r in summary("lossy")] == ["completed"] * 2, report
    said = (tmp_path / "lossy.log").read_text()
    assert re.search(rf"\[lossy\] trial {lost_trial} lost \(.+\); started again \(1 failure\(s\) so far\)", said), said
    assert "Traceback" not in said, said  # Tune's own account of the loss stays in the sweep's log file
    ref, got = summary("reference")[0], summary("lossy")[0]  # best first
    assert got["model.dropout"] == pytest.approx(ref["model.dropout"]), report
    assert got["best val/ndcg@10"] == pytest.approx(ref["best val/ndcg@10"], abs=1e-6), report


def _open_files(p) -> list:
    import psutil

    try:
        return p.open_files()
    except psutil.Error:
        return []
