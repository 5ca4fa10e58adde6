"""Faults of a run's life (issue 26): owners, the finish, names, full disks, tracking outages, signals.

Each test reproduces what a hostile but realistic user did, and asserts the new outcome.
"""

from __future__ import annotations

import signal

import pytest
from test_faults import HANG, fails, hung_at, job_file  # noqa: F401  (job_file: a fixture)

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
