"""Faults of a run's life (issue 26): owners, the finish, names, full disks, tracking outages, signals.

Each test reproduces what a hostile but realistic user did, and asserts the new outcome.
"""

from __future__ import annotations

import os
import re
import signal

import pytest
from test_faults import HANG, fails, hung_at

from rayrec.cli import main


def mlflow_runs(cfg):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


# ----------------------------------------------------------------------------- 1. one owner per run


TRAIN_AND_HANG_AT_EPOCH_1 = """
from rayrec.tracking import mlflow_tracking as T
real = T.Tracker.log_metrics
def log_metrics(self, metrics, step=None):
    if step == 1 and "val/ndcg@10" in metrics:
        {hang}
    return real(self, metrics, step)
T.Tracker.log_metrics = log_metrics
from rayrec.cli import main
main(["train", {job!r}, "--local"])
"""


def test_a_live_run_refuses_a_second_trainer_and_a_dead_ones_is_taken_over(job_file, capsys):
    path, cfg = job_file
    with hung_at(TRAIN_AND_HANG_AT_EPOCH_1.format(hang=HANG, job=str(path))) as owner:
        fails(capsys, ["train", str(path), "--local", "train.optim.lr=0.001"],
              rf"run t is being trained by PID {owner.pid} on .* since .*; pick another run.name or wait")
    assert not (cfg.run.storage_path / "t" / "final").exists()  # the refused run trained nothing
    (run,) = mlflow_runs(cfg)  # nor opened or logged into the live run
    assert run.data.params["train.optim.lr"] == "0.005"
    assert main(["train", str(path), "--local"]) == 0  # its owner is dead: the re-run takes it over
    (run,) = mlflow_runs(cfg)
    assert run.info.status == "FINISHED"


# ----------------------------------------------------------------------------- 6. run.name


@pytest.mark.parametrize("name", [".", "..", "x" * 101])
def test_a_run_name_that_is_not_a_folder_of_its_own_is_refused(job_file, capsys, name):
    path, cfg = job_file
    fails(capsys, ["train", str(path), "--local", f"run.name={name}"], r"run\.name")
    assert not cfg.run.storage_path.exists() and not (cfg.run.storage_path.parent / ".rayrec_complete").exists()


# ----------------------------------------------------------------------------- 8. the finish


def test_json_into_a_missing_folder_is_refused_before_training(job_file, capsys, tmp_path):
    path, cfg = job_file
    fails(capsys, ["train", str(path), "--local", "--json", str(tmp_path / "nope" / "m.json")],
          r"--json .*m\.json: folder .*nope does not exist")
    assert not cfg.run.storage_path.exists()


def test_a_failure_at_the_finish_marks_the_run_failed_and_a_rerun_completes(job_file, monkeypatch):
    from rayrec import recipes
    from rayrec.tracking.mlflow_tracking import Tracker

    path, cfg = job_file

    def read_only(self, fig, name):
        raise PermissionError(13, "Permission denied", "/artifacts/learning_curves.png")

    with monkeypatch.context() as m:
        m.setattr(Tracker, "log_figure", read_only)
        with pytest.raises(PermissionError):
            recipes.run(cfg, local=True)
    (run,) = mlflow_runs(cfg)
    assert run.info.status == "FAILED" and not (cfg.run.storage_path / "t" / ".rayrec_complete").exists()
    again = recipes.run(cfg, local=True)
    assert again.mlflow_run_id == run.info.run_id and (cfg.run.storage_path / "t" / ".rayrec_complete").exists()
    assert [r.info.status for r in mlflow_runs(cfg)] == ["FINISHED"]


# ----------------------------------------------------------------------------- 7. a full disk


def test_a_full_disk_during_a_checkpoint_names_the_file_and_leaves_no_temporary(job_file, capsys):
    import os
    import subprocess
    import sys

    path, cfg = job_file
    run = cfg.run.storage_path / "t"
    (run / "epoch_0002").mkdir(parents=True)
    # the checkpoint's temporary name leads to /dev/full: every write there fails with ENOSPC
    (run / "epoch_0002" / f".state.pt.tmp-{os.getpid()}").symlink_to("/dev/full")
    fails(capsys, ["train", str(path), "--local"],
          r"no space left on the disk of .*epoch_0002/state\.pt \(\d+ MiB free there\)")
    assert not list(run.rglob("*.tmp-*")) and (run / "epoch_0001" / "state.pt").is_file()
    (run,) = mlflow_runs(cfg)
    assert run.info.status == "FAILED"
    # a writer killed with -9 leaves its temporary: the next owner of the run clears it
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = cfg.run.storage_path / "t" / "epoch_0001" / f".state.pt.tmp-{int(dead.stdout)}"
    stale.write_bytes(b"PK half")
    assert main(["train", str(path), "--local"]) == 0
    assert not stale.exists()


# ----------------------------------------------------------------------------- 5. silently wrong results


@pytest.fixture
def own_data(tiny_dataset, tmp_path):
    """A copy of the tiny dataset the test may tamper with, and a job file reading it."""
    import shutil

    from rayrec.config import dump_job

    def make(cfg):
        data = tmp_path / "data"
        shutil.copytree(tiny_dataset, data)
        cfg = cfg.model_copy(deep=True)
        cfg.data.path = data
        path = tmp_path / "own.yaml"
        path.write_text(dump_job(cfg))
        return path, cfg

    return make


def test_resuming_on_a_dataset_prepared_again_is_refused(job_file, own_data, monkeypatch, capsys):
    from test_fault_tolerance import crash_in

    from rayrec import recipes

    path, cfg = own_data(job_file[1])
    crash_in(monkeypatch, lambda m, s: m.get("epoch") == 1, lambda: recipes.run(cfg, local=True))
    assert main(["data", "synth", "--out", str(cfg.data.path), "--users", "300", "--items", "120", "--no-images",
                 "--seed", "9", "--overwrite"]) == 0
    fails(capsys, ["train", str(path), "--local"],
          r"the checkpoint was trained on the dataset \w+ \(300 users, 120 items, \d+ events\), but data.path "
          r".*data now holds \w+ .*start a new run")


def _tamper(data, split, **columns):
    import pandas as pd

    table = pd.read_parquet(data / f"{split}.parquet")
    for k, v in columns.items():
        table[k] = v(table[k])
    table.to_parquet(data / f"{split}.parquet")


@pytest.mark.parametrize("tamper, pattern", [
    (lambda d: (d / "manifest.json").write_text((d / "manifest.json").read_text().replace('"items": 120', '"items": 600')),
     r"manifest.json says 600 items but items.parquet holds 120"),
    (lambda d: _tamper(d, "test", target=lambda t: t.where(t.index != 3, 0)),
     r"test.parquet: 1 targets are 0 \(0 is the padding id, item ids are 1..120\)"),
    (lambda d: _tamper(d, "valid", history=lambda h: h.map(lambda x: [*x, 4000])),
     r"valid.parquet: column history holds item ids 1..4000, outside 1..120"),
    (lambda d: (d / "manifest.json").write_text('{"schema_version": 1, "counts": '),
     r"manifest.json is corrupt \(JSONDecodeError.*prepare the dataset again"),
])
def test_a_dataset_that_disagrees_with_its_manifest_is_refused(job_file, own_data, capsys, tamper, pattern):
    path, cfg = own_data(job_file[1])
    tamper(cfg.data.path)
    fails(capsys, ["train", str(path), "--local"], pattern)


@pytest.mark.parametrize("override, pattern", [
    ("train.eval.ks=[10,120]", r"train.eval.ks has \[120\] but the dataset has 120 items"),
    ("train.eval.mode=sampled:1000000000", r"sampled:1000000000: more negatives than the 120 items"),
    ("model.max_len=10000000", r"model.max_len.*less than or equal to 10000"),
])
def test_settings_the_catalogue_cannot_give_are_refused(job_file, capsys, override, pattern):
    path, cfg = job_file
    fails(capsys, ["train", str(path), "--local", override], pattern)


def test_a_key_given_twice_or_a_file_not_in_utf8_is_refused(job_file, capsys, tmp_path):
    path, _ = job_file
    text = path.read_text()
    twice = tmp_path / "twice.yaml"
    twice.write_text(text.replace("train:\n", "train:\n  epochs: 9\n", 1))
    fails(capsys, ["train", str(twice), "--local"], r"twice.yaml:\d+: key train.epochs is given twice \(also on line \d+\)")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"# caf\xe9\n" + text.encode())
    fails(capsys, ["train", str(latin), "--local"], r"latin.yaml:1: not UTF-8 \(byte 0xe9\)")


def test_resuming_into_a_model_of_another_size_says_so(job_file, capsys, monkeypatch):
    from test_fault_tolerance import crash_in

    from rayrec import recipes

    path, cfg = job_file
    crash_in(monkeypatch, lambda m, s: m.get("epoch") == 1, lambda: recipes.run(cfg, local=True))
    for _ in range(2):  # the same line on every re-run, with what to do
        fails(capsys, ["train", str(path), "--local", "model.hidden=32"],
              r"the checkpoint holds a model of another size \(.*\(\d+, 16\) there, \(\d+, 32\) here.*start a new run")


# ----------------------------------------------------------------------------- 2. tracking outages


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 that a test can kill (-9, its whole process group) and start again."""

    def __init__(self, folder, artifacts: str | None = None, env: dict[str, str] | None = None):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.folder, self.proc = folder, None
        self.artifacts, self.env = artifacts or str(folder / "artifacts"), env  # artifacts: a folder or s3://...
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        import subprocess
        import sys
        import time

        import requests

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.folder}/m.db",
             "--artifacts-destination", self.artifacts, "--host", "127.0.0.1", "--port",
             str(self.port), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=open(self.folder / "server.log", "ab"), start_new_session=True,
            env={**os.environ, **(self.env or {})})
        for _ in range(300):
            try:
                if requests.get(f"{self.uri}/health", timeout=1).ok:
                    return
            except requests.RequestException:
                time.sleep(0.1)
        raise AssertionError(f"mlflow server did not start: {(self.folder / 'server.log').read_text()[-2000:]}")

    def kill(self) -> None:
        import os

        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path)
    server.start()
    yield server
    server.kill()


def test_a_tracking_outage_never_kills_the_run(job_file, mlflow_server, monkeypatch, capsys, tmp_path):
    from mlflow.tracking import MlflowClient

    from rayrec.train.local import LocalReporter

    path, cfg = job_file
    real = LocalReporter.report
    events = {1: mlflow_server.kill, 2: mlflow_server.start}  # down after epoch 1, back after epoch 2

    def report(self, metrics, state):
        real(self, metrics, state)
        events.pop(int(metrics.get("epoch", 0)), lambda: None)()

    monkeypatch.setattr(LocalReporter, "report", report)
    common = ["--local", f"tracking.uri={mlflow_server.uri}"]
    assert main(["train", str(path), *common, "tracking.max_outage_s=120"]) == 0
    client = MlflowClient(mlflow_server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "FINISHED"  # what waited through the outage was logged, in order
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/ndcg_at_10")] == [1, 2, 3]
    assert "test/ndcg_at_10" in run.data.metrics and "MLflow did not get" not in capsys.readouterr().out

    events = {1: mlflow_server.kill, 3: mlflow_server.start}  # down for longer than max_outage_s
    assert main(["train", str(path), *common, "tracking.max_outage_s=1", "run.name=gap"]) == 0
    out = capsys.readouterr()
    assert re.search(r"tracking/not_logged +\d+", out.out) and "test/ndcg@10" in out.out
    assert re.search(r"MLflow did not get \d+ writes of this run .*the tracking server did not answer", out.out)
    assert (cfg.run.storage_path / "gap" / ".rayrec_complete").exists()
    (gap,) = [r for r in client.search_runs([run.info.experiment_id]) if r.info.run_name == "gap"]
    assert gap.info.status == "FINISHED" and int(gap.data.tags["rayrec.tracking.not_logged"]) > 0
    assert main(["diagnose", gap.info.run_id, "--tracking-uri", mlflow_server.uri, "--out", str(tmp_path / "d")]) == 0
    assert re.search(r"\[warning\] not_logged: \d+ writes of this run .* never reached MLflow", capsys.readouterr().out)


def test_a_store_that_never_answers_costs_bounded_time_and_is_counted():
    import time

    from rayrec.tracking.mlflow_tracking import Tracker

    tracker = Tracker("http://127.0.0.1:9", "0" * 32, max_outage_s=0.5)  # nothing listens on port 9
    start = time.monotonic()
    for step in range(5):
        tracker.log_metrics({"train/loss": 1.0}, step=step)
    tracker.set_tags({"a": 1})
    assert tracker.finish("FINISHED", timeout=2) == 7  # 5 metric batches, the tags, the status
    assert time.monotonic() - start < 20 and tracker.history("train/loss") == []


# ----------------------------------------------------------------------------- 3. signals


PAUSE_AFTER_EPOCH_1 = """
import os, pathlib, time
from rayrec.train import local
real = local.LocalReporter.report
def report(self, metrics, state):
    real(self, metrics, state)
    if metrics.get("epoch") == 1 and "val/ndcg@10" in metrics:  # the epoch-1 checkpoint is written
        pathlib.Path(os.environ["RAYREC_FAULT"]).touch()
        for _ in range(60):
            time.sleep(0.05)  # the signal arrives here
local.LocalReporter.report = report
from rayrec.cli import main
raise SystemExit(main(["train", {job!r}, "--local"]))
"""


@pytest.mark.parametrize("sig, times", [(signal.SIGTERM, 1), (signal.SIGHUP, 1), (signal.SIGTERM, 2)],
                         ids=["term", "hup", "term-twice"])
def test_a_signal_stops_a_local_run_cleanly_and_the_rerun_resumes(job_file, sig, times):
    import os

    from test_faults import _finish_and_compare

    path, cfg = job_file
    with hung_at(PAUSE_AFTER_EPOCH_1.format(job=str(path))) as proc:
        for _ in range(times):  # once: at the next step boundary; twice: at once
            os.kill(proc.pid, sig)
        assert proc.wait(60) == 128 + sig
    err = proc.stderr_text()
    assert re.search(rf"stopped: stopped by {sig.name}; the newest complete checkpoint is .*/t/epoch_0001: run the "
                     "same command again to resume from it", err), err
    assert "Traceback" not in err
    (run,) = mlflow_runs(cfg)
    assert run.info.status == "KILLED" and not list((cfg.run.storage_path / "t").rglob("*.tmp-*"))
    if (sig, times) == (signal.SIGTERM, 1):  # ends where an uninterrupted run ends
        again = _finish_and_compare(cfg, path)
    else:
        from rayrec import recipes

        again = recipes.run(cfg, local=True)
    assert [m["epoch"] for m in again.history] == [2, 3]  # resumed from the newest complete checkpoint


@pytest.mark.slow
def test_a_signal_stops_a_ray_run_with_one_line_and_the_rerun_resumes_from_the_newest_checkpoint(tiny_job, tmp_path):
    """On Ray the driver stops at once (Ray Train aborts the workers); nothing raw reaches the terminal, and
    the re-run starts after the newest complete checkpoint, even one Ray had not registered yet."""
    import os
    import subprocess
    import sys
    import time

    from rayrec.config import dump_job
    from rayrec.train.checkpoint import latest_checkpoint

    cfg = tiny_job.model_copy(deep=True)
    cfg.train.epochs, cfg.train.early_stopping.patience = 200, 500
    path = tmp_path / "ray.yaml"
    path.write_text(dump_job(cfg))
    run = cfg.run.storage_path / "t"
    cmd = [sys.executable, "-m", "rayrec", "train", str(path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (run / "epoch_0002" / "state.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    newest = latest_checkpoint(run)
    assert re.search(r"^stopped: stopped by SIGTERM; the newest complete checkpoint is .*/t/epoch_\d{4}: run the same "
                     r"command again to resume from it$", err.strip().splitlines()[-1]), err
    assert "rayrec-console" not in out + err and "Traceback" not in err
    (mlrun,) = mlflow_runs(cfg)
    assert mlrun.info.status == "KILLED"
    done = int(newest.name.split("_")[1])
    again = subprocess.run([*cmd, f"train.epochs={done + 1}"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    epochs = re.findall(r"^epoch (\d+)/", again.stdout, re.M)
    assert epochs == [str(done + 1)], again.stdout  # resumed after the newest complete checkpoint


def test_ray_train_still_takes_sigint_over_where_rayrec_turns_it_off():
    """``runs.fit`` replaces this method of Ray's trainer (its SIGINT handler exits silently with 1); a Ray
    upgrade that renames it would bring that back unnoticed."""
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    assert callable(getattr(DataParallelTrainer, "_register_sigint_handler", None))


# ----------------------------------------------------------------------------- 9. tracking stores that cannot be used


def test_a_corrupt_or_deleted_tracking_store_is_one_line(job_file, capsys, tmp_path):
    from mlflow.tracking import MlflowClient

    path, cfg = job_file
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"not a database " * 100)
    fails(capsys, ["train", str(path), "--local", f"tracking.uri=sqlite:///{bad}"],
          r"MLflow store .*bad.db is not a readable SQLite database \(corrupt, or another file\): move it aside")
    client = MlflowClient(cfg.tracking.uri)
    client.delete_experiment(client.create_experiment("tests"))
    fails(capsys, ["train", str(path), "--local"],
          r"MLflow experiment 'tests' is deleted in .*: restore it \(`mlflow experiments restore --experiment-id \d+`\)")


def test_a_locked_store_is_named_with_the_fix():
    import sqlite3

    from rayrec.tracking.mlflow_tracking import store_error

    line = store_error("sqlite:////data/mlflow.db", sqlite3.OperationalError("database is locked"))
    assert line.startswith("MLflow store /data/mlflow.db stayed locked by another process: wait for it, or use an "
                           "MLflow server")


def test_first_writers_of_a_new_sqlite_store_do_not_race(tmp_path):
    """MLflow creates the tables on first use; three processes at once broke it (alembic's migration race)."""
    import subprocess
    import sys

    code = ("import sys; from rayrec.tracking.mlflow_tracking import open_run; "
            f"open_run('sqlite:///{tmp_path}/new.db', 'e', sys.argv[1], sys.argv[1])")
    procs = [subprocess.Popen([sys.executable, "-c", code, f"/run{i}"], stderr=subprocess.PIPE, text=True)
             for i in range(3)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors[0][-2000:] + errors[1][-2000:]


def test_any_write_that_finds_the_disk_full_is_one_line(monkeypatch, capsys, tmp_path):
    import errno

    from rayrec.cli import data as data_cli

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "train.parquet"))

    monkeypatch.setattr(data_cli, "cmd_data_synth", full)
    fails(capsys, ["data", "synth", "--out", str(tmp_path / "out")],
          r"^error: no space left on the disk of .*out/train.parquet; free space or write to a larger disk")
