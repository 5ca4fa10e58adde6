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
