"""Runs on object storage (issue 28, item 5): ``run.storage_path=s3://bucket/prefix`` through pyarrow's file
systems and Ray Train, against a real S3 API on 127.0.0.1 (``moto``'s server) with credentials only in the
environment. The fast tests hold what is refused before anything starts."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_faults import fails

from rayrec.cli import main
from rayrec.storage import home_uri, is_object_uri, local_home, storage_value

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- refused before anything starts


@pytest.mark.parametrize("given, kept", [("s3://bucket/runs/", "s3://bucket/runs"), ("gs://b/a/b", "gs://b/a/b"),
                                         ("runs", Path("runs"))])
def test_an_object_store_uri_stays_a_uri_and_a_folder_a_path(given, kept):
    assert storage_value(given) == kept
    assert is_object_uri(storage_value(given)) == isinstance(kept, str)


def test_a_run_copy_folder_maps_back_to_its_uri(monkeypatch, tmp_path):
    monkeypatch.setenv("RAYREC_HOME", str(tmp_path))
    home = local_home("s3://bucket/runs/t/final")
    assert home == tmp_path / "object_runs" / "s3" / "bucket" / "runs" / "t" / "final"
    assert home_uri(home.parent) == "s3://bucket/runs/t"
    assert home_uri(tmp_path / "elsewhere") is None


@pytest.mark.parametrize("uri, pattern", [
    ("s3://AKIAEXAMPLE:wJalrXUtnFEMIsecretKEY1@bucket/runs", r"credentials do not go in the storage URI.*AWS_ACCESS_KEY_ID"),
    ("s3://bucket/runs?secret_key=wJalrXUtnFEMIsecretKEY1", r"credentials do not go in the storage URI"),
    ("hdfs://namenode/runs", r"hdfs:// is not a storage rayrec writes to"),
    ("s3:///runs", r"names no bucket"),
])
def test_a_storage_uri_with_credentials_or_of_another_kind_is_refused(job_file, capsys, uri, pattern):
    path, _ = job_file
    assert main(["train", str(path), f"run.storage_path={uri}"]) == 2
    err = capsys.readouterr().err
    assert re.search(pattern, err) and "run.storage_path" in err, err
    assert "wJalrXUtnFEMIsecretKEY1" not in err  # the message masks what it echoes


def test_object_storage_is_refused_for_a_run_in_one_process(job_file, capsys):
    path, _ = job_file
    fails(capsys, ["train", str(path), "run.storage_path=s3://bucket/runs", "--local"],
          r"run.storage_path s3://bucket/runs: this job runs in one process .*Give it a folder")


def test_a_sweep_folder_uri_stays_a_uri():
    from rayrec.tune.space import load_space

    sweep = load_space(ROOT / "search_spaces" / "sasrec_quick.yaml", ["storage_path=s3://bucket/tune/"])
    assert sweep.space.storage_path == "s3://bucket/tune"


# ----------------------------------------------------------------------------- on a real S3 API


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on 127.0.0.1, its credentials in this process's environment (the drivers, the Ray
    head and the MLflow server inherit them, as a cluster's nodes have theirs)."""
    from local_s3 import LocalS3

    server = LocalS3(tmp_path_factory.mktemp("s3")).start()
    before = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    server.client().create_bucket(Bucket="bucket")
    try:
        yield server
    finally:
        server.stop()
        for k, v in before.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def s3_head(s3):
    from local_ray import LocalHead, raise_interrupt_on_sigterm

    previous = raise_interrupt_on_sigterm()
    head = LocalHead(num_cpus=3)
    try:
        yield head.start()
    finally:
        head.stop()
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.slow
def test_a_run_on_s3_killed_and_run_again_resumes_and_ends_as_the_uninterrupted_one(s3, s3_head, ft_job,
                                                                                    tmp_path):
    """The uninterrupted run, then one whose driver is SIGKILLed after epoch 1's checkpoint reached the bucket:
    the same command resumes it from the newest checkpoint there, one MLflow run, the same test metrics.
    MLflow's artifacts go to the bucket too (an MLflow server with --artifacts-destination s3://...), and
    the secret key is in no file, object, param or log the runs left."""
    from test_fault_tolerance import alive, finish, start_driver
    from test_faults_runs import MlflowServer

    from rayrec.runs import newest_stored
    from rayrec.storage import ObjectFolder

    mlflow = MlflowServer(tmp_path, artifacts="s3://bucket/mlflow")
    mlflow.start()
    home = tmp_path / "home"
    try:
        def job(name: str) -> Path:
            path = ft_job(name)  # 4 epochs, 2 failures allowed, checkpoints: the best 2 + the newest
            text = path.read_text().replace(f"storage_path: {ft_job.work / 'runs'}", "storage_path: s3://bucket/runs")
            text = text.replace(f"uri: sqlite:///{ft_job.work}/mlflow.db", f"uri: {mlflow.uri}")
            assert "s3://bucket/runs" in text and mlflow.uri in text
            path.write_text(text)
            return path

        def driver(path: Path) -> subprocess.Popen:
            return start_driver(s3_head, path, path.with_suffix(".log"))

        os.environ["RAYREC_HOME"] = str(home)  # the drivers' own folders of the runs (lock, log, copies)
        t0 = time.monotonic()
        path = job("s3ref")
        ref = finish(driver(path), path.with_suffix(".log"))
        ref_s = time.monotonic() - t0

        keys = s3.keys("bucket", "runs/s3ref/")
        assert "runs/s3ref/final/state.pt" in keys and "runs/s3ref/.rayrec_complete" in keys
        assert s3.read("bucket", "runs/s3ref/best_checkpoint.txt").decode() == "s3://bucket/runs/s3ref/final"
        kept = {k.split("/")[2] for k in keys if k.endswith("/state.pt")}
        assert len(kept - {"final"}) <= 2, kept  # num_to_keep, on the bucket
        from rayrec.recs.evaluate import eval_recs  # the finished run's recommendations, from its URI

        assert main(["recommend", "s3://bucket/runs/s3ref", "--k", "10", "--out", str(tmp_path / "recs"), "--local"]) == 0
        assert eval_recs(tmp_path / "recs", "test")["test/ndcg@10"] == pytest.approx(ref["test/ndcg@10"], abs=1e-6)

        path = job("s3kill")
        log = path.with_suffix(".log")
        t0 = time.monotonic()
        proc = driver(path)
        store = ObjectFolder.at("s3://bucket/runs/s3kill")
        deadline = time.monotonic() + 600
        while not store.exists("epoch_0001/state.pt"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 180
        while (alive(s3_head, "RayTrainWorker") or alive(s3_head, "TrainController")) and time.monotonic() < deadline:
            time.sleep(1)  # Ray ends the actors of a dead driver; until then they may still checkpoint
        resumed_from = newest_stored(store)
        assert resumed_from and not store.exists(".rayrec_complete")
        out = finish(driver(path), log)
        killed_s = time.monotonic() - t0
        print(f"\ns3 kill -9: resumed from {resumed_from}; test/ndcg@10 {out['test/ndcg@10']:.6f} vs "
              f"{ref['test/ndcg@10']:.6f} uninterrupted; wall {killed_s:.0f} s vs {ref_s:.0f} s "
              f"({killed_s - ref_s:+.0f} s)")

        from mlflow.tracking import MlflowClient

        c = MlflowClient(mlflow.uri)
        exp = c.get_experiment_by_name("ft")
        (run,) = c.search_runs([exp.experiment_id], filter_string="tags.`rayrec.run_dir` = 's3://bucket/runs/s3kill'")
        assert run.info.status == "FINISHED"
        epoch = int(resumed_from.rsplit("_", 1)[1])
        assert [m.value for m in c.get_metric_history(run.info.run_id, "resume/epoch")] == [float(epoch)]
        assert out["test/ndcg@10"] == pytest.approx(ref["test/ndcg@10"], abs=1e-6)
        assert out["best/val/ndcg@10"] == pytest.approx(ref["best/val/ndcg@10"], abs=1e-6)
        assert run.data.tags["rayrec.checkpoint"] == "s3://bucket/runs/s3kill/final"

        artifacts = s3.keys("bucket", "mlflow/")
        assert any(k.endswith(f"{run.info.run_id}/artifacts/learning_curves.png") for k in artifacts), artifacts

        secret = s3.secret.encode()
        leaks = [str(p) for folder in (ft_job.work, home, tmp_path) for p in Path(folder).rglob("*")
                 if p.is_file() and secret in p.read_bytes()]
        leaks += [k for k in s3.keys("bucket") if secret in s3.read("bucket", k)]
        leaks += [k for k, v in {**run.data.params, **run.data.tags}.items() if s3.secret in v]
        assert not leaks, leaks
    finally:
        os.environ.pop("RAYREC_HOME", None)
        mlflow.kill()


@pytest.mark.slow
def test_a_two_trial_sweep_keeps_its_state_and_its_trials_runs_on_s3(s3, s3_head, ft_job, tmp_path):
    """`rayrec tune` with storage_path=s3://...: Tune's state, each trial's checkpoints and completion marker,
    the summary and the best job are in the bucket; the console and the CSVs in the driver's own folder."""
    import yaml
    from local_ray import BIN
    from mlflow.tracking import MlflowClient

    job = ft_job("s3sweep_base")
    text = job.read_text().replace(f"storage_path: {ft_job.work / 'runs'}", "storage_path: s3://bucket/runs")
    job.write_text(text.replace("epochs: 4", "epochs: 2"))
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({
        "job": str(job), "name": "s3sweep", "metric": "val/ndcg@10", "num_samples": 2, "max_concurrent_trials": 2,
        "params": {"model.dropout": {"dist": "uniform", "low": 0.0, "high": 0.3}},
        "trial": {"num_workers": 1, "resources_per_worker": {"CPU": 0.25}, "driver_cpu": 0.25},
        "searcher": {"name": "random", "seed": 0}, "scheduler": {"name": "none"},
        "storage_path": "s3://bucket/tune"}, sort_keys=False))
    env = s3_head.env(RAY_ADDRESS=s3_head.gcs_address, RAYREC_HOME=str(tmp_path / "home"))
    done = subprocess.run([str(BIN / "rayrec"), "tune", str(space)], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "sweep store:  s3://bucket/tune/s3sweep " in done.stdout, done.stdout

    keys = s3.keys("bucket", "tune/s3sweep/")
    finals = [k for k in keys if k.endswith("/final/state.pt")]
    trials = {k.split("/")[2] for k in finals}
    assert len(trials) == 2 and all(t.startswith("trial_") for t in trials), keys
    for trial in trials:  # each trial is a rayrec run in the trial's folder, finished
        assert any(k.startswith(f"tune/s3sweep/{trial}/") and k.endswith("/.rayrec_complete") for k in keys)
    assert {"tune/s3sweep/summary.csv", "tune/s3sweep/best.yaml", "tune/s3sweep/.rayrec_sweep_complete"} <= set(keys)
    assert any(k.startswith("tune/s3sweep/experiment_state") for k in keys), keys  # what --resume restores
    best = yaml.safe_load(s3.read("bucket", "tune/s3sweep/best.yaml"))
    assert best["run"]["storage_path"] == "s3://bucket/runs"  # `rayrec train best.yaml` trains on the bucket too
    assert (tmp_path / "home" / "object_runs" / "s3" / "bucket" / "tune" / "s3sweep" / "summary.csv").is_file()

    c = MlflowClient(f"sqlite:///{ft_job.work}/mlflow.db")
    exp = c.get_experiment_by_name("ft")
    (parent,) = c.search_runs([exp.experiment_id], "tags.`rayrec.run_dir` = 's3://bucket/tune/s3sweep'")
    kids = c.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert parent.info.status == "FINISHED" and sorted(k.info.status for k in kids) == ["FINISHED"] * 2
