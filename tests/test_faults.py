"""Faults and hostile inputs: nothing lost, nothing half-written, clear errors.

Each case is a way a user lost data or got a wrong record before (issue 16): prepare's
``--overwrite`` and concurrent prepares, interrupted writes, a torn newest checkpoint.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from rayrec.cli import main
from rayrec.data.dataset import open_prepared
from rayrec.errors import DataError

SYNTH = ["--users", "60", "--items", "40", "--no-images", "--seed", "3"]


def synth(out: Path, *extra: str) -> int:
    return main(["data", "synth", "--out", str(out), *SYNTH, *extra])


def fails(capsys, argv: list[str], pattern: str) -> None:
    """The command exits 2 with ``pattern`` in its error message (what a user sees)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(pattern, err), err


def write_ml100k(folder: Path) -> Path:
    """A raw MovieLens-100K folder (u.data) with 30 users of 6 events."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"{u}\t{(u * 7 + k) % 50 + 1}\t4\t{1000 + k}" for u in range(1, 31) for k in range(6)]
    (folder / "u.data").write_text("\n".join(lines) + "\n")
    return folder


def tree(folder: Path) -> dict[str, bytes]:
    """Every file's bytes; a manifest without its creation time (the same data, prepared again)."""
    import re

    files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    if "manifest.json" in files:
        files["manifest.json"] = re.sub(rb'"created_at": "[^"]*"', b"", files["manifest.json"])
    return files


# ----------------------------------------------------------------------------- prepare --overwrite


def test_overwrite_refuses_the_input_folder_and_its_ancestors(tmp_path, capsys):
    raw = write_ml100k(tmp_path / "raw" / "ml-100k")
    (tmp_path / "raw" / "notes.txt").write_text("mine")
    before = tree(tmp_path)
    for out in (raw, raw.parent, tmp_path):
        fails(capsys, ["data", "prepare", "movielens-100k", "--input", str(raw), "--out", str(out), "--overwrite"],
              "is the input folder or holds it")
    assert tree(tmp_path) == before


def test_overwrite_replaces_only_a_prepared_dataset(tmp_path, capsys):
    raw = write_ml100k(tmp_path / "ml-100k")
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"\xff\xd8 not a dataset")
    fails(capsys, ["data", "prepare", "movielens-100k", "--input", str(raw), "--out", str(other), "--overwrite"],
          r"photos holds no manifest.json.*cat.jpg")
    assert (other / "cat.jpg").read_bytes() == b"\xff\xd8 not a dataset"
    a_file = tmp_path / "out.parquet"
    a_file.write_text("x")
    fails(capsys, ["data", "prepare", "movielens-100k", "--input", str(raw), "--out", str(a_file), "--overwrite"],
          "out.parquet is a file")
    out = tmp_path / "prepared"
    assert synth(out) == 0
    first = open_prepared(out).manifest
    assert synth(out, "--overwrite", "--min-seq-len", "4") == 0  # a dataset is replaced
    assert open_prepared(out).manifest["filters"] != first["filters"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ml-100k", "out.parquet", "photos", "prepared"]


def _slow_synth(out: str, started, ready) -> None:
    """A prepare that holds its output lock until told to finish (run in a child process)."""
    from rayrec.data import prepare as prep

    real = prep.build

    def build(*args, **kwargs):
        started.set()
        ready.wait(60)
        return real(*args, **kwargs)

    prep.build = build
    sys.exit(synth(Path(out)))


def test_a_second_writer_of_the_same_output_fails_clearly(tmp_path, capsys):
    out = tmp_path / "prepared"
    ctx = mp.get_context("fork")
    started, ready = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_slow_synth, args=(str(out), started, ready))
    child.start()
    try:
        assert started.wait(60)
        fails(capsys, ["data", "synth", "--out", str(out), *SYNTH, "--overwrite"], "another process is writing .*prepared")
    finally:
        ready.set()
        child.join(60)
    assert child.exitcode == 0 and open_prepared(out).manifest["source"] == "synthetic"


def test_a_prepare_killed_mid_write_leaves_the_old_output_and_a_rerun_recovers(tmp_path):
    out = tmp_path / "prepared"
    assert synth(out) == 0
    before = tree(out)
    code = ("import sys, time\nfrom rayrec.data import prepare as prep\nfrom rayrec.cli import main\n"
            "real = prep._write_table\n"
            "def slow(*a, **k):\n    real(*a, **k)\n    print('writing', flush=True)\n    time.sleep(60)\n"
            "prep._write_table = slow\n"
            f"main(['data', 'synth', '--out', {str(out)!r}, {', '.join(map(repr, SYNTH))}, '--overwrite'])\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    assert tree(out) == before  # the old output is whole
    assert synth(out, "--overwrite") == 0  # the lock of the dead writer is free, its leftovers go
    assert tree(out) == before  # same seed, same dataset
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


def test_the_swap_keeps_the_old_output_until_the_new_one_is_in(tmp_path, monkeypatch):
    from rayrec.data import atomic

    out = tmp_path / "prepared"
    assert synth(out) == 0
    before = tree(out)
    real = atomic._rename
    calls = []

    def failing(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # the new output's rename fails: the old one must come back
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(atomic, "_rename", failing)
    assert synth(out, "--overwrite", "--min-seq-len", "4") == 2  # "error: no space left on the disk ..."
    assert tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]
    assert calls[0][0] == "prepared" and calls[0][1].startswith(".prepared.old-")


def test_a_dataset_that_appears_meanwhile_is_not_replaced_without_overwrite(tmp_path, monkeypatch, capsys):
    """Checked again under the lock, at the swap: a folder written meanwhile (by hand, or a tool
    that takes no lock) is kept."""
    import shutil

    from rayrec.data import prepare as prep

    ref, out = tmp_path / "ref", tmp_path / "prepared"
    assert synth(ref) == 0
    real = prep.build

    def build(*args, **kwargs):
        shutil.copytree(ref, out)
        return real(*args, **kwargs)

    monkeypatch.setattr(prep, "build", build)
    fails(capsys, ["data", "synth", "--out", str(out), *SYNTH[:-2], "--seed", "4"], "prepared already exists")
    assert tree(out) == tree(ref) and sorted(p.name for p in tmp_path.iterdir()) == ["prepared", "ref"]


def test_the_feature_cache_replaces_only_a_feature_folder(tiny_mm_dataset, tmp_path):
    from rayrec.config.joint import FeaturesConfig
    from rayrec.data.features import compute_features

    out = tmp_path / "features"
    out.mkdir()
    (out / "thesis.pdf").write_bytes(b"%PDF")
    cfg = FeaturesConfig(text_model="hash:16", dir=out, cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match=r"features holds no features.json.*thesis.pdf"):
        compute_features(cfg, tiny_mm_dataset, 300)
    assert [p.name for p in out.iterdir()] == ["thesis.pdf"]
    (out / "thesis.pdf").unlink()
    out.rmdir()
    first = compute_features(cfg, tiny_mm_dataset, 300)
    again = compute_features(cfg.model_copy(update={"text_model": "hash:8"}), tiny_mm_dataset, 300)
    assert first["dims"]["item_text"] == 16 and again["dims"]["item_text"] == 8  # ours: replaced whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "features"]


# ----------------------------------------------------------------------------- checkpoints


def test_a_crash_in_the_first_epoch_with_step_checkpoints_resumes(tiny_job, tmp_path, monkeypatch):
    """Before any validation the early-stopping state is empty: resuming from such a checkpoint
    failed with KeyError: 'best'."""
    from test_fault_tolerance import crash_in, local

    from rayrec.train.checkpoint import latest_checkpoint

    cfg = tiny_job.model_copy(deep=True)
    cfg.train.epochs = 2
    cfg.run.checkpoint.every_n_steps = 4
    full, _ = local(cfg, tmp_path / "full")
    crash_in(monkeypatch, lambda m, s: m.get("mid_epoch_step") == 4, lambda: local(cfg, tmp_path / "cut"))
    ckpt = latest_checkpoint(tmp_path / "cut")
    assert ckpt.name == "epoch_0001_step_0000004"
    resumed, _ = local(cfg, tmp_path / "cut", resume_from=ckpt)
    assert resumed["test/ndcg@10"] == pytest.approx(full["test/ndcg@10"], rel=1e-6)


def test_a_torn_newest_checkpoint_is_skipped_with_a_warning(tiny_job, tmp_path, caplog, capsys):
    from test_fault_tolerance import local

    from rayrec.train.checkpoint import CheckpointError, load_state, newest_readable

    cfg = tiny_job.model_copy(deep=True)
    cfg.train.epochs = 2
    full, _ = local(cfg, tmp_path / "run")
    run = tmp_path / "run"
    for name in ("final", "epoch_0002"):  # killed while the file system lost the end of the newest one
        state = run / name / "state.pt"
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"epoch_0002/state.pt: unreadable checkpoint"):
        load_state(run / "epoch_0002")
    assert newest_readable(run) == run / "epoch_0001"
    assert "final/state.pt: unreadable checkpoint" in caplog.text and "epoch_0002/state.pt" in caplog.text
    resumed, _ = local(cfg, run, resume_from=newest_readable(run))
    assert resumed["test/ndcg@10"] == pytest.approx(full["test/ndcg@10"], rel=1e-6)
    assert main(["eval", "jobs/quickstart.yaml", "--checkpoint", str(tmp_path / "nope")]) == 2
    assert "nope/state.pt: no rayrec checkpoint here" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad configs


@pytest.mark.parametrize("metric, hint", [("val/hr@15", "add 15 to train.eval.ks"), ("val/ndcg10", "val/ndcg@10"),
                                          ("val/recall@10", "val/hr@10")])
def test_an_early_stopping_metric_validation_never_produces_fails_at_load(metric, hint):
    from rayrec.config.loader import load_model
    from rayrec.config.schema import JobConfig
    from rayrec.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"train.early_stopping.metric.*{re.escape(metric)}.*{re.escape(hint)}"):
        load_model(JobConfig, Path("jobs/quickstart.yaml"), [f"train.early_stopping.metric={metric}"])
    load_model(JobConfig, Path("jobs/quickstart.yaml"), ["train.early_stopping.metric=val/mean_rank",
                                                         "train.early_stopping.mode=min"])


# ----------------------------------------------------------------------------- prompt cache


def test_an_append_after_a_torn_cache_line_is_kept(tmp_path, caplog):
    from rayrec.prefs.cache import PromptCache

    path = tmp_path / "prefs.jsonl"
    cache = PromptCache(path)
    cache.put("a", {"text": "likes noir"})
    with path.open("a") as f:
        f.write('{"key": "b", "text": "likes sp')  # killed mid-append
    again = PromptCache(path)
    assert set(again.entries) == {"a"} and "prefs.jsonl:2: unreadable cache line" in caplog.text
    again.put("c", {"text": "likes jazz"})
    assert set(PromptCache(path).entries) == {"a", "c"}  # the request after the crash is not paid twice
    assert path.read_text().splitlines()[-1] == '{"key": "c", "text": "likes jazz"}'


# ----------------------------------------------------------------------------- secrets

PASSWORD = "hunter2-never-shown"


def test_credentials_in_the_tracking_uri_are_never_shown_or_stored(capsys):
    from rayrec.config import dump_job
    from rayrec.config.loader import flatten, load_model
    from rayrec.config.schema import JobConfig
    from rayrec.tracking.mlflow_tracking import resolve_uri

    uri = f"http://bob:{PASSWORD}@127.0.0.1:1/?token=t0k3n-x&region=eu"
    cfg = load_model(JobConfig, Path("jobs/quickstart.yaml"), [f"tracking.uri={uri}"])
    assert cfg.tracking.uri == uri  # used as given
    stored = dump_job(cfg) + repr(flatten(cfg))  # resolved.yaml, checkpoints, MLflow params
    assert PASSWORD not in stored and "t0k3n-x" not in stored and "http://bob:***@127.0.0.1:1/?token=***&region=eu" in stored
    assert resolve_uri("http://bob:***@mlflow:5000") == "http://mlflow:5000"  # a stored one: MLflow's env vars
    assert main(["train", "jobs/quickstart.yaml", f"tracking.uri={uri}", "--local"]) == 2
    out = capsys.readouterr()
    assert "unreachable" in out.err and PASSWORD not in out.err + out.out and "bob:***@" in out.err
    assert main(["train", "jobs/quickstart.yaml", f"tracking.uri={uri}", "train.epochs=x"]) == 2
    assert PASSWORD not in capsys.readouterr().err


def test_submit_sends_uri_credentials_as_secrets_and_refuses_secret_looking_env(capsys, monkeypatch):
    from rayrec.cli import build_parser
    from rayrec.submit import build_submission

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    args = build_parser().parse_args(["submit", "jobs/quickstart.yaml", "--mlflow-uri",
                                      f"http://bob:{PASSWORD}@mlflow:5000", "--no-pip"])
    sub = build_submission(args)
    env = sub.runtime_env["env_vars"]
    assert "tracking.uri=http://mlflow:5000" in sub.entrypoint and PASSWORD not in sub.entrypoint
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000" and env["MLFLOW_TRACKING_PASSWORD"] == PASSWORD
    assert env["MLFLOW_TRACKING_USERNAME"] == "bob"
    assert PASSWORD not in sub.describe() and "MLFLOW_TRACKING_PASSWORD=<secret>" in sub.describe()
    for pair in ("OPENAI_APIKEY=abc", "DB_PASS=abc", "MY_PWD=abc", "GH_CREDENTIALS=abc",
                 f"HELPER=sk-{PASSWORD}0123456789", f"STORE=s3://u:{PASSWORD}@b/x"):
        assert main(["submit", "jobs/quickstart.yaml", "--env", pair, "--dry-run", "--no-pip"]) == 2
        err = capsys.readouterr().err
        assert "looks like a secret" in err and "abc" not in err and PASSWORD not in err, pair
    assert main(["submit", "jobs/quickstart.yaml", "--env", "HF_HOME=/mnt/hf", "--dry-run", "--no-pip"]) == 0


def test_a_key_pasted_as_api_key_env_is_not_echoed():
    from rayrec.config.loader import load_model
    from rayrec.config.schema import JobConfig
    from rayrec.errors import ConfigError

    key = "sk-proj-0123456789abcdefABCDEF0123"
    with pytest.raises(ConfigError) as e:
        load_model(JobConfig, Path("jobs/ur4rec_ml100k.yaml"), [f"model.prefs.api_key_env={key}"])
    assert key not in str(e.value) and "not hold the key itself" in str(e.value)


# ----------------------------------------------------------------------------- sweeps


def test_tune_refuses_an_override_of_a_searched_param(capsys):
    assert main(["tune", "search_spaces/sasrec_quick.yaml", "model.hidden=64", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "model.hidden is searched by this space" in err and "ignored by every trial" in err
    assert main(["tune", "search_spaces/sasrec_quick.yaml", "model.dropout=0.1", "model.num_blocks=1",
                 "--dry-run"]) == 2
    assert "model.dropout is searched" in capsys.readouterr().err
    assert main(["tune", "search_spaces/sasrec_quick.yaml", "model.num_blocks=1", "--dry-run"]) == 0


def test_tune_dry_run_validates_sampled_configs_across_fields(tmp_path, capsys):
    """Each value alone fits the base job (hidden 48 heads 2, or hidden 48 heads 3), but hidden 32
    with 3 heads does not: only whole sampled configs show it."""
    root = Path(__file__).resolve().parents[1]
    space = tmp_path / "heads.yaml"
    space.write_text(f"job: {root}/jobs/quickstart.yaml\noverrides: [model.hidden=48, model.num_heads=2]\n"
                     "metric: val/ndcg@10\nparams:\n  model.hidden: {dist: choice, values: [32, 48]}\n"
                     "  model.num_heads: {dist: choice, values: [2, 3]}\nnum_samples: 4\n"
                     "searcher: {name: random, seed: 0}\nscheduler: {name: none}\n")
    assert main(["tune", str(space), "--dry-run"]) == 2
    out = capsys.readouterr().out
    assert "sampled configs are invalid jobs" in out and "must be divisible by num_heads (3)" in out
    space.write_text(space.read_text().replace("values: [2, 3]", "values: [2, 4]"))
    assert main(["tune", str(space), "--dry-run"]) == 0
    assert "all valid" in capsys.readouterr().out


# ----------------------------------------------------------------------------- bad input files


def test_repeated_events_are_counted_and_optionally_dropped(tmp_path, capsys):
    raw = write_ml100k(tmp_path / "ml-100k")
    with (raw / "u.data").open("a") as f:
        f.write("1\t8\t4\t1000\n1\t8\t4\t1000\n")  # user 1's first event, twice more
    assert main(["data", "prepare", "movielens-100k", "--input", str(raw), "--out", str(tmp_path / "kept")]) == 0
    assert open_prepared(tmp_path / "kept").manifest["duplicates"] == {"found": 2, "dropped": 0}
    assert main(["data", "prepare", "movielens-100k", "--input", str(raw), "--out", str(tmp_path / "dropped"),
                 "--drop-duplicates"]) == 0
    dropped = open_prepared(tmp_path / "dropped")
    assert dropped.manifest["duplicates"] == {"found": 2, "dropped": 2}
    assert dropped.manifest["counts"]["interactions"] == open_prepared(tmp_path / "kept").manifest["counts"][
        "interactions"] - 2


def test_an_absurd_timestamp_is_a_bad_line_and_an_empty_file_says_so(tmp_path, capsys):
    raw = write_ml100k(tmp_path / "ml-100k")
    with (raw / "u.data").open("a") as f:
        f.write("1\t9\t4\t1e30\n")
    fails(capsys, ["data", "prepare", "movielens-100k", "--input", str(raw), "--out", str(tmp_path / "o")],
          r"u.data:181: bad timestamp '1e30'")
    (raw / "u.data").write_text("")
    fails(capsys, ["data", "prepare", "movielens-100k", "--input", str(raw), "--out", str(tmp_path / "o")],
          r"no interactions in .*u.data: the file is empty")
    assert "relax" not in capsys.readouterr().err


def test_one_stray_byte_is_a_bad_line_not_a_latin1_file(tmp_path, capsys):
    raw = write_ml100k(tmp_path / "ml-100k")
    items = [f"{i}|Caf\u00e9 {i} (1995)|01-Jan-1995||http://x|" + "|".join("0" * 19) for i in range(1, 51)]
    data = ("\n".join(items) + "\n").encode("utf-8").replace(b"Caf\xc3\xa9 7 ", b"Caf\xe9 7 ")  # line 7: latin-1
    (raw / "u.item").write_bytes(data)
    fails(capsys, ["data", "prepare", "movielens-100k", "--input", str(raw), "--out", str(tmp_path / "o")],
          r"u.item:7: not UTF-8 \(byte 0xe9 at column 6\)")
    assert main(["data", "prepare", "movielens-100k", "--input", str(raw), "--out", str(tmp_path / "o"),
                 "--on-bad-line", "skip"]) == 0
    titles = open_prepared(tmp_path / "o").table("items")["title"].tolist()
    assert "Caf\u00e9 8 (1995)" in titles and not any("\u00c3" in str(t) for t in titles)  # no mojibake


def test_a_minionerec_csv_with_a_latin1_byte_names_the_line(tmp_path, capsys):
    from minionerec_fixture import CSV_NAME, write_fixture

    root = write_fixture(tmp_path / "Amazon")
    path = root / "train" / f"{CSV_NAME}.csv"
    lines = path.read_bytes().split(b"\n")
    lines[3] = lines[3].replace(b"Loctite", b"Loct\xefte", 1).replace(b"3D Solutech", b"3D Sol\xefutech", 1)
    path.write_bytes(b"\n".join(lines))
    fails(capsys, ["data", "prepare", "minionerec", "--input", str(root), "--out", str(tmp_path / "o")],
          rf"{CSV_NAME}.csv:4: not UTF-8")


def test_an_override_without_a_value_after_an_option_says_key_value(capsys):
    with pytest.raises(SystemExit):
        main(["train", "jobs/quickstart.yaml", "--local", "train.epochs", "2"])
    assert "overrides are key=value with no spaces (e.g. train.epochs=VALUE" in capsys.readouterr().err


def test_a_torn_embedding_cache_shard_is_recomputed_with_a_warning(tmp_path, caplog):
    import numpy as np

    from rayrec.data.features import EmbeddingCache

    cache = EmbeddingCache(tmp_path, "hash:4")
    cache.put(["a", "b"], np.ones((2, 4)))
    first = set(cache.dir.glob("part-*.npz"))
    EmbeddingCache(tmp_path, "hash:4").put(["c"], np.zeros((1, 4)))
    (torn,) = set(cache.dir.glob("part-*.npz")) - first
    torn.write_bytes(torn.read_bytes()[:40])  # killed mid-write by an older version, or a bad disk
    (cache.dir / "part-empty.npz").write_bytes(b"")
    got = EmbeddingCache(tmp_path, "hash:4").get(["a", "b", "c"])
    assert set(got) == {"a", "b"} and "unreadable embedding-cache shard" in caplog.text
    assert len(list(cache.dir.glob("part-*.npz"))) == 1  # the torn shards are gone, the good one stays


def test_local_runs_keep_the_best_checkpoints_and_the_newest(tiny_job, tmp_path):
    import json

    from test_fault_tolerance import local

    cfg = tiny_job.model_copy(deep=True)
    cfg.train.epochs, cfg.run.checkpoint.every_n_steps, cfg.run.checkpoint.num_to_keep = 4, 4, 2
    cfg.train.early_stopping.patience = 10
    _, rep = local(cfg, tmp_path / "run")
    kept = sorted(p.name for p in (tmp_path / "run").iterdir())
    scores = {int(m["epoch"]): m["val/ndcg@10"] for m in rep.metrics[:-1]}
    best = sorted(scores, key=lambda e: -scores[e])[:2]
    assert kept == sorted([*(f"epoch_{e:04d}" for e in best), "final"]), (kept, scores)
    for name in kept:
        if name != "final":
            assert json.loads((tmp_path / "run" / name / "score.json").read_text())["value"] == scores[int(name[-4:])]


def test_a_resume_with_a_changed_config_is_recorded(tiny_job, tmp_path, monkeypatch, caplog):
    from mlflow.tracking import MlflowClient
    from test_fault_tolerance import crash_in

    from rayrec import recipes

    cfg = tiny_job.model_copy(deep=True)
    crash_in(monkeypatch, lambda m, s: m.get("epoch") == 1, lambda: recipes.run(cfg, local=True))
    cfg.train.epochs, cfg.train.optim.lr = 4, 0.004  # the re-run continues the same run with other values
    out = recipes.run(cfg, local=True)
    client = MlflowClient(cfg.tracking.uri)
    run = client.get_run(out.mlflow_run_id)
    assert run.data.params["train.epochs"] == "3" and run.data.params["train.optim.lr"] == "0.005"
    assert run.data.tags["rayrec.changed.train.epochs"] == "3 -> 4"
    assert run.data.tags["rayrec.changed.train.optim.lr"] == "0.005 -> 0.004"
    assert run.data.tags["rayrec.config_version"] == "2" and "resumes with a changed config" in caplog.text
    files = {f.path for f in client.list_artifacts(out.mlflow_run_id, "config")}
    assert files == {"config/resolved.yaml", "config/resolved.v2.yaml"}
    assert run.info.status == "FINISHED" and len(client.get_metric_history(out.mlflow_run_id, "val/ndcg_at_10")) == 4


# ----------------------------------------------------------------------------- kill -9, then re-run


@contextmanager
def hung_at(code: str) -> Iterator[subprocess.Popen]:
    """Run ``code`` in a fresh Python until it reaches the fault (``HANG`` in its code: it touches the
    file named by $RAYREC_FAULT, the console may own its stdout, then hangs); yield the process, hung
    there; SIGKILL it after the block."""
    import tempfile
    import time

    marker = Path(tempfile.mkdtemp()) / "reached"
    errors = marker.with_name("stderr")  # read back as ``proc.stderr_text()``
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=errors.open("wb"),
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent), "RAYREC_FAULT": str(marker)})
    proc.stderr_text = lambda: errors.read_text(errors="replace")
    try:
        while not marker.exists():
            if proc.poll() is not None:
                raise AssertionError(f"the child exited ({proc.returncode}) before reaching the fault: "
                                     f"{proc.stderr_text()[-2000:]}")
            time.sleep(0.05)
        yield proc
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(60)


def killed_at(code: str) -> None:
    """Run ``code`` in a fresh Python; SIGKILL it once it reaches the fault (see ``hung_at``)."""
    with hung_at(code) as proc:
        pass
    assert proc.returncode == -signal.SIGKILL


HANG = "import os as _o, pathlib as _p, time as _t; _p.Path(_o.environ['RAYREC_FAULT']).touch(); _t.sleep(120)"


def _finish_and_compare(cfg, job_path):
    """The re-run of the killed job continues its run and ends where an uninterrupted run ends."""
    from mlflow.tracking import MlflowClient

    from rayrec import recipes

    again = recipes.run(cfg, local=True)
    clean = recipes.run(cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": "clean"})}), local=True)
    assert again.metrics["test/ndcg@10"] == pytest.approx(clean.metrics["test/ndcg@10"], rel=1e-6)
    client = MlflowClient(cfg.tracking.uri)
    assert client.get_run(again.mlflow_run_id).info.status == "FINISHED"
    return again


def test_killed_while_writing_a_checkpoint(job_file):
    path, cfg = job_file
    killed_at(f"""
from pathlib import Path
import os
from rayrec.train import local
real = local.save_state
def save(state, folder):
    if int(state["epoch"]) == 2:  # the epoch-2 checkpoint: half a file under its temporary name
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f".state.pt.tmp-{{os.getpid()}}").write_bytes(b"PK\\x03\\x04 half")
        {HANG}
    return real(state, folder)
local.save_state = save
from rayrec.cli import main
main(["train", {str(path)!r}, "--local"])
""")
    again = _finish_and_compare(cfg, path)
    assert [m["epoch"] for m in again.history] == [2, 3]  # resumed after epoch 1


def test_killed_while_writing_to_mlflow(job_file):
    path, cfg = job_file
    killed_at(f"""
from rayrec.tracking import mlflow_tracking as T
real = T.Tracker.log_metrics
def log_metrics(self, metrics, step=None):
    if step == 2 and "val/ndcg@10" in metrics:
        {HANG}
    return real(self, metrics, step)
T.Tracker.log_metrics = log_metrics
from rayrec.cli import main
main(["train", {str(path)!r}, "--local"])
""")
    _finish_and_compare(cfg, path)


def test_killed_while_writing_the_feature_cache(tiny_mm_dataset, tmp_path):
    from rayrec.config.joint import FeaturesConfig
    from rayrec.data.features import compute_features

    cfg = FeaturesConfig(text_model="hash:16", dir=tmp_path / "features", cache_dir=tmp_path / "cache")
    killed_at(f"""
import numpy as np
from pathlib import Path
from rayrec.config.joint import FeaturesConfig
from rayrec.data import features as F
real = np.save
def save(path, array):
    real(path, array)
    if str(path).endswith("item_image.npy"):
        {HANG}
F.np.save = save
F.compute_features(FeaturesConfig(text_model="hash:16", dir=Path({str(cfg.dir)!r}), cache_dir=Path({str(cfg.cache_dir)!r})),
                   Path({str(tiny_mm_dataset)!r}), 300)
""")
    assert not cfg.dir.exists()  # nothing half-written under the real name
    done = compute_features(cfg, tiny_mm_dataset, 300)
    assert done["rows"]["item_text"] == 121 and sorted(p.name for p in tmp_path.iterdir()) == ["cache", "features"]


def test_killed_while_appending_to_the_prompt_cache(tmp_path):
    from rayrec.prefs.cache import PromptCache

    path = tmp_path / "prefs.jsonl"
    PromptCache(path).put("a", {"text": "likes noir"})
    killed_at(f"""
from rayrec.prefs import cache as C
class Torn:
    def __init__(self, f): self.f = f
    def write(self, data):
        self.f.write(data[: len(data) // 2]); self.f.flush()
        {HANG}
    def flush(self): pass
    def tell(self): return self.f.tell()
real_open = C.Path.open
def opened(self, mode="r", *a, **k):
    f = real_open(self, mode, *a, **k)
    if "a" in mode:
        class Ctx:
            def __enter__(s): return Torn(f)
            def __exit__(s, *e): f.close()
        return Ctx()
    return f
C.Path.open = opened
cache = C.PromptCache({str(path)!r})
cache.put("b", {{"text": "likes space"}})
""")
    cache = PromptCache(path)
    assert set(cache.entries) == {"a"}  # the torn "b" is skipped: asked again
    cache.put("b", {"text": "likes space"})
    assert set(PromptCache(path).entries) == {"a", "b"}
