"""The one job driver (``rayrec.runs``) and its console: what every recipe gets from it."""

from __future__ import annotations

import io
import logging
import os
import re
import time
from pathlib import Path

import pytest
from test_genrec_ray import job_dict

from rayrec import recipes
from rayrec.config.genrec import GenRecJobConfig
from rayrec.console import MAGIC, Console, job_console
from rayrec.errors import ClusterError
from rayrec.runs import COMPLETE_MARKER


def tiny_sft(dataset: Path, tmp: Path, **train) -> GenRecJobConfig:
    """One optimizer step of test_genrec_ray's tiny LoRA SFT job."""
    cfg = job_dict(dataset, tmp, batch_size=8, val_rows=0, **train)
    cfg["prompts"]["max_examples"] = 8
    return GenRecJobConfig.model_validate(cfg)


# ----------------------------------------------------------------------------- the console


def test_epoch_lines_without_a_tty_are_plain_lines_once_each():
    out = io.StringIO()
    con = Console(["train/loss", "val/ndcg@10"], out=out, tty=False)
    con.handle({"ev": "start", "total": 12, "initial": 0, "epochs": 3})
    for step in range(1, 13):
        con.handle({"ev": "step", "done": step, "epoch": 1 + (step - 1) // 4, "desc": ""})
    con.handle({"ev": "epoch", "metrics": {"epoch": 1, "train/loss": 5.0, "val/ndcg@10": 0.125, "val/hr@10": 0.3}})
    con.handle({"ev": "epoch", "metrics": {"test/ndcg@10": 0.25, "best_epoch": 1, "epoch": 1}})
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in out.getvalue()  # no bar fragments in a log
    assert lines[0].startswith("epoch 1/3  train/loss 5.0000  val/ndcg@10 0.1250") and "hr@10" not in lines[0]
    assert lines[1].startswith("test (best epoch 1)  test/ndcg@10 0.2500")


def test_on_a_tty_one_bar_is_redrawn_in_place():
    out = io.StringIO()
    con = Console(["train/loss"], out=out, tty=True)
    con.handle({"ev": "start", "total": 8, "initial": 0, "epochs": 2})
    for step in range(1, 9):
        con.handle({"ev": "step", "done": step, "epoch": 1 + (step - 1) // 4, "desc": "sasrec"})
    con.handle({"ev": "epoch", "metrics": {"epoch": 2, "train/loss": 4.5}})
    con.close()
    text = out.getvalue()
    assert text.count("\r") >= 8 and "epoch 2/2 sasrec" in text and "8/8" in text  # one bar, redrawn
    assert text.count("epoch 2/2  train/loss 4.5000") == 1


def test_worker_output_goes_to_the_log_and_only_console_events_to_the_screen(tmp_path, capsys):
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    printed: list[str] = []  # what Ray's own printer would have shown
    ray_handlers = dispatcher.handlers  # a Ray started by an earlier test has its own printer there
    dispatcher.handlers = [("ray_print_logs", lambda data: printed.extend(data["lines"]))]
    screen = io.StringIO()
    console_handler = logging.StreamHandler(screen)  # the terminal's log handler (`rayrec` sets one up)
    before = list(logging.getLogger().handlers)
    logging.getLogger().addHandler(console_handler)
    try:
        with job_console(tmp_path, ["train/loss"]) as con:
            con.attach_ray()
            dispatcher.emit({"pid": 11, "actor_name": "RayTrainWorker", "lines": [
                "Token authentication is enabled for this Ray cluster.",
                MAGIC + '{"ev": "epoch", "metrics": {"epoch": 1, "train/loss": 3.25}}',
                "[2026-12-01 19:52:01,116 E 123 456] core_worker.cc:3221: PreemptionWatcher failed"]})
            logging.getLogger("ray.data").warning("exclude_resources is deprecated")
            logging.getLogger("rayrec.test").info("a message of rayrec's own")
        # right after the run: a stopped run's shutdown output goes to its log, console events nowhere
        dispatcher.emit({"pid": 12, "lines": ["shutting down", MAGIC + '{"ev": "step", "done": 9}']})
        for _, handler in dispatcher.handlers:
            handler.until = 0  # later: Ray's printer shows other work of this process again
        dispatcher.emit({"pid": 12, "lines": ["after the run", MAGIC + '{"ev": "step", "done": 10}']})
    finally:
        logging.getLogger().removeHandler(console_handler)
        dispatcher.handlers = ray_handlers
    shown = screen.getvalue() + capsys.readouterr().out
    assert "epoch 1  train/loss 3.2500" in shown and "a message of rayrec's own" in shown
    assert "Token" not in shown and "PreemptionWatcher" not in shown and "exclude_resources" not in shown
    assert printed == ["after the run"]
    log = (tmp_path / "rayrec.log").read_text()
    assert "Token authentication" in log and "PreemptionWatcher" in log and "exclude_resources" in log
    assert "(RayTrainWorker pid=11)" in log and "epoch 1  train/loss 3.2500" in log
    assert "(12) shutting down" in log and '"done": 9' not in log and "after the run" not in log
    assert logging.getLogger().handlers == before  # the run's file handler is gone again


def test_a_local_run_prints_each_epoch_once_and_says_where_its_log_is(tiny_job, capsys):
    from rayrec.cli import main
    from rayrec.config import dump_job

    job = Path(tiny_job.run.storage_path).parent / "job.yaml"
    job.write_text(dump_job(tiny_job))
    assert main(["train", str(job), "--local"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split("  ")[0] for ln in lines if re.match(r"epoch \d+/", ln)] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert sum(ln.startswith("test (best epoch") for ln in lines) == 1
    assert lines[-1].startswith("log:") and lines[-1].split()[1].endswith("runs/t/rayrec.log")
    assert Path(lines[-1].split()[1]).read_text().count("epoch 3/3") == 1


# ----------------------------------------------------------------------------- the same for every recipe


def test_sft_writes_under_the_storage_root(tiny_dataset, tmp_path, monkeypatch):
    cfg = tiny_sft(tiny_dataset, tmp_path)
    cfg.run.storage_path = Path("runs")  # relative: under $RAYREC_STORAGE_ROOT on a cluster
    cfg.tracking.enabled = False
    monkeypatch.setenv("RAYREC_STORAGE_ROOT", str(tmp_path / "shared"))
    monkeypatch.chdir(tmp_path)
    out = recipes.run(cfg, local=True)
    assert out.run_dir == tmp_path / "shared" / "runs" / "g" and (out.run_dir / COMPLETE_MARKER).exists()
    assert Path(out.checkpoint).is_relative_to(tmp_path / "shared") and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("kind", ["sequential", "sft"])
def test_workers_that_cannot_be_placed_time_out_with_the_shortfall(ray_session, tiny_job, tiny_dataset, tmp_path, kind,
                                                                   caplog):
    """The job fits the cluster but another holds the CPUs: scaling.start_timeout_s, not forever, with
    the same message for every recipe (`rayrec train` and `rayrec sft`), and one line while it waits."""
    from ray.util.placement_group import placement_group, remove_placement_group

    cfg = tiny_job.model_copy(deep=True) if kind == "sequential" else tiny_sft(tiny_dataset, tmp_path)
    cfg.scaling.resources_per_worker = {"CPU": 1.0}
    cfg.scaling.start_timeout_s, cfg.scaling.start_attempts = 5, 1
    hog = placement_group([{"CPU": 1.5}])  # another job's reservation
    ray_session.get(hog.ready(), timeout=60)
    start = time.monotonic()
    try:
        with pytest.raises(ClusterError, match=r"1 workers x \(CPU 1\) were not placed within 5 s \(1 attempt.*; "
                           r"free now: CPU [\d.]+ of 2, GPU 0 of 0 on 1 node\(s\)"):
            recipes.run(cfg)
    finally:
        remove_placement_group(hog)
    assert time.monotonic() - start < 90
    waits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for the cluster")]
    assert len(waits) == 1 and re.match(r"waiting for the cluster to place 1 workers x \(CPU 1\); free now: CPU "
                                        r"[\d.]+ of 2.*up to 5 s \(scaling.start_timeout_s\)", waits[0]), waits
    assert os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S") is None  # set for the run only


def test_a_workers_error_is_one_line_naming_its_rank_and_resume_from_is_read_from_the_working_dir(
        ray_session, job_file, tmp_path, monkeypatch, capsys):
    """A worker that fails (here: resuming a checkpoint of another model size) ends the run with the worker's
    own message on one line, not Ray's traceback snippets; `--resume-from` relative to where the command
    runs (Ray's workers run in other folders)."""
    from rayrec.cli import main

    path, cfg = job_file
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(path), "--local", "train.epochs=1"]) == 0
    assert (tmp_path / "runs" / "t" / "final" / "state.pt").is_file()
    capsys.readouterr()
    assert main(["train", str(path), "run.name=bigger", "model.hidden=32", "--resume-from", "runs/t/final"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"^error: training failed on worker rank 0: the checkpoint holds a model of another size "
                     r"\(.*\(\d+, 16\) there, \(\d+, 32\) here", err.strip().splitlines()[-1]), err
    assert "Traceback" not in err and "Error Snippet" not in err, err
    assert "Error Snippet" in (tmp_path / "runs" / "bigger" / "rayrec.log").read_text()  # Ray's account: in the log
    assert main(["train", str(path), "run.name=none", "--resume-from", "runs/nope"]) == 2
    assert "--resume-from runs/nope: no such checkpoint folder" in capsys.readouterr().err


def test_std_streams_go_to_the_log_while_rayrec_keeps_the_terminal(tmp_path):
    """Ray's C++ core worker writes straight to fd 2, libraries' progress bars and banners to sys.stderr
    and sys.stdout: during a run all of it lands in rayrec.log; the console's lines and rayrec's own
    log lines stay on the terminal."""
    import subprocess
    import sys

    script = f"""
import logging, os, sys
from pathlib import Path
from rayrec.console import job_console
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
with job_console(Path({str(tmp_path)!r}), []) as con:
    con.line("console line")
    os.write(2, b"[E core_worker.cc:2465] native noise\\n")
    logging.getLogger("rayrec.x").info("rayrec line")
    print("a library's progress bar", file=sys.stderr)
    print("a library's banner")
os.write(2, b"after the run\\n")
print("stdout after the run")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "native noise" not in proc.stderr and "progress bar" not in proc.stderr and "rayrec line" in proc.stderr
    assert "after the run" in proc.stderr  # the terminal again
    assert proc.stdout == "console line\nstdout after the run\n"
    log = (tmp_path / "rayrec.log").read_text()
    assert "native noise" in log and "progress bar" in log and "banner" in log and "rayrec line" in log
    assert "console line" in log and "after the run" not in log


def test_the_storage_root_also_holds_sid_indexes_and_feature_caches(tiny_dataset, tmp_path, monkeypatch):
    from rayrec.cluster import shared_paths
    from rayrec.config import load_job

    monkeypatch.setenv("RAYREC_STORAGE_ROOT", str(tmp_path / "shared"))
    sft = tiny_sft(tiny_dataset, tmp_path)
    sft.sids.dir = Path("data/sids")
    assert shared_paths(sft).sids.dir == tmp_path / "shared" / "data/sids"
    assert shared_paths(sft).data.path == sft.data.path  # absolute: kept
    joint = load_job(Path(__file__).resolve().parents[1] / "jobs" / "ur4rec_quickstart.yaml")
    moved = shared_paths(joint)
    assert moved.model.features.cache_dir == tmp_path / "shared" / joint.model.features.cache_dir
    assert moved.data.path == tmp_path / "shared" / joint.data.path and joint.data.path.is_absolute() is False
