"""`rayrec submit` and `ray job submit` against a real Ray head (slow), and every bad input
failing before anything is sent (fast)."""

from __future__ import annotations

import http.server
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from rayrec.cli import build_parser, main
from rayrec.submit import build_submission, submission_id

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "rayrec-test-token-0123456789abcdef"
SECRET = "s3cr3t-value-never-printed"
#: The quickstart job, shrunk to seconds (300 users, width 16, 2 epochs, 1 worker).
TINY = ["data.synth.users=300", "data.synth.items=120", "data.synth.mean_len=20", "data.synth.images=false",
        "model.hidden=16", "model.num_blocks=1", "model.max_len=20", "train.epochs=2", "scaling.num_workers=1",
        "train.eval.ks=[10]"]


def submit_args(*argv: str):
    args = build_parser().parse_args(["submit", *argv])
    return args


@pytest.fixture(autouse=True)
def in_project(monkeypatch):
    monkeypatch.chdir(ROOT)  # the working dir of a submission is the project


@pytest.fixture
def no_send(monkeypatch):
    """Fail the test if anything is sent to a cluster."""
    def refuse(*a, **k):
        raise AssertionError("submitted although the input was bad")

    monkeypatch.setattr("rayrec.submit.send", refuse)


# ----------------------------------------------------------------------------- what is sent


def test_submission_carries_pins_mlflow_secrets_and_an_id(monkeypatch):
    monkeypatch.setenv("RR_TEST_SECRET", SECRET)
    args = submit_args("jobs/quickstart.yaml", "scaling.num_workers=1", "--mlflow-uri", "http://mlflow:5000",
                       "--env", "FOO=bar", "--secret-env", "RR_TEST_SECRET")
    sub = build_submission(args)
    assert sub.entrypoint == ("python -m rayrec train jobs/quickstart.yaml scaling.num_workers=1 "
                              "tracking.uri=http://mlflow:5000")
    env = sub.runtime_env["env_vars"]
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000" and env["FOO"] == "bar" and env["RR_TEST_SECRET"] == SECRET
    pins = sub.runtime_env["pip"]["packages"]
    assert "ray[data,default,train,tune]==2.60.0" in pins and all("==" in p for p in pins)
    assert Path(sub.runtime_env["working_dir"]) == ROOT and ".git" in sub.runtime_env["excludes"]
    assert re.fullmatch(r"rayrec-quickstart-\d{8}-\d{6}", sub.submission_id)
    assert sub.metadata["rayrec.job"] == "jobs/quickstart.yaml"
    described = sub.describe()
    assert SECRET not in described and "RR_TEST_SECRET=<secret>" in described


def test_submission_id_is_the_job_and_the_utc_time():
    assert submission_id(Path("jobs/SASRec_ml1m.yaml"), now=0) == "rayrec-sasrec-ml1m-19700101-000000"


def test_explicit_tracking_override_wins_and_flags_reach_the_command(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://team:5000")
    sub = build_submission(submit_args("jobs/quickstart.yaml", "tracking.uri=sqlite:////x/m.db", "--no-pip",
                                       "--command", "train --json out.json"))
    assert sub.entrypoint.endswith("train jobs/quickstart.yaml tracking.uri=sqlite:////x/m.db --json out.json")
    assert "pip" not in sub.runtime_env


def test_a_local_mlflow_store_is_flagged(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (warning,) = build_submission(submit_args("jobs/quickstart.yaml", "--no-pip")).warnings
    assert "sqlite:///mlflow.db, a local store" in warning and "--mlflow-uri" in warning
    assert not build_submission(submit_args("jobs/quickstart.yaml", "--no-pip", "--mlflow-uri", "http://m:5000")).warnings


# ----------------------------------------------------------------------------- bad input


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(["submit", *argv])
    err = capsys.readouterr().err.strip()
    return code, err


def test_unreachable_address_fails_before_submission(capsys, no_send):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, err = run_cli(capsys, "jobs/quickstart.yaml", "--address", f"127.0.0.1:{port}", "--no-pip")
    assert code == 2 and err.count("\n") == 0
    assert f"cannot reach the Ray dashboard at http://127.0.0.1:{port}" in err


def test_missing_job_file_fails_before_submission(capsys, no_send):
    code, err = run_cli(capsys, "jobs/nope.yaml", "--address", "http://127.0.0.1:1")
    assert code == 2 and err == "error: jobs/nope.yaml: no such job file"


def test_missing_secret_fails_before_submission(capsys, no_send, monkeypatch):
    monkeypatch.delenv("RR_TEST_ABSENT", raising=False)
    code, err = run_cli(capsys, "jobs/quickstart.yaml", "--address", "http://127.0.0.1:1",
                        "--secret-env", "RR_TEST_ABSENT")
    assert code == 2 and err == "error: --secret-env RR_TEST_ABSENT: RR_TEST_ABSENT is not set in this shell; export it first"


def test_secret_values_are_refused_on_the_command_line(capsys, no_send):
    code, err = run_cli(capsys, "jobs/quickstart.yaml", "--env", "MLFLOW_TRACKING_TOKEN=abc", "--dry-run")
    assert code == 2 and "pass it by name with --secret-env MLFLOW_TRACKING_TOKEN" in err and "abc" not in err


def test_bad_override_and_outside_job_fail_before_submission(capsys, no_send, tmp_path):
    code, err = run_cli(capsys, "jobs/quickstart.yaml", "train.epochz=3", "--address", "http://127.0.0.1:1")
    assert code == 2 and "unknown key 'train.epochz'" in err and "did you mean train.epochs" in err
    outside = tmp_path / "job.yaml"
    outside.write_text((ROOT / "jobs" / "quickstart.yaml").read_text())
    code, err = run_cli(capsys, str(outside), "--address", "http://127.0.0.1:1")
    assert code == 2 and "outside the working dir" in err


class _Auth401(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # what a Ray >= 2.59 head with token auth answers without a token
        self.send_response(401 if "Authorization" not in self.headers else 403)
        self.end_headers()

    def log_message(self, *a):
        pass


def test_token_auth_refusals_say_how_to_pass_the_token(capsys, no_send, monkeypatch):
    server = http.server.HTTPServer(("127.0.0.1", 0), _Auth401)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = f"http://127.0.0.1:{server.server_port}"
    try:
        monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
        code, err = run_cli(capsys, "jobs/quickstart.yaml", "--address", address, "--no-pip")
        assert code == 2 and "uses token auth and no token was sent: export RAY_AUTH_TOKEN" in err
        monkeypatch.setenv("RAY_AUTH_TOKEN", "wrong")
        code, err = run_cli(capsys, "jobs/quickstart.yaml", "--address", address, "--no-pip")
        assert code == 2 and "rejected the auth token" in err and "wrong" not in err
    finally:
        server.shutdown()


# ----------------------------------------------------------------------------- a real head (slow)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A Ray head with token auth (as Ray >= 2.59 clusters have) and a shared storage root."""
    from local_ray import LocalHead, raise_interrupt_on_sigterm

    storage = tmp_path_factory.mktemp("shared")
    previous = raise_interrupt_on_sigterm()
    h = LocalHead(num_cpus=3, env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN,
                                   "RAYREC_STORAGE_ROOT": str(storage)})
    h.storage = storage
    try:
        yield h.start()
    finally:
        h.stop()
        signal.signal(signal.SIGTERM, previous)


def mlflow_runs(db: Path, experiment: str = "quickstart"):
    c = MlflowClient(f"sqlite:///{db}")
    exp = c.get_experiment_by_name(experiment)
    return c, (c.search_runs([exp.experiment_id]) if exp else [])


@pytest.mark.slow
def test_ray_job_submit_runs_the_quickstart_job(head, tmp_path):
    """Plain `ray job submit --working-dir . -- rayrec train ...`: SUCCEEDED, and its MLflow run
    and checkpoints are where the cluster's storage root says."""
    from local_ray import BIN

    db = tmp_path / "mlflow.db"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", head.dashboard, "--working-dir", ".",
           "--submission-id", "plain-quickstart", "--", "rayrec", "train", "jobs/quickstart.yaml", *TINY,
           "run.name=plain", f"tracking.uri=sqlite:///{db}"]
    r = subprocess.run(cmd, cwd=ROOT, env=head.env(RAY_AUTH_MODE="token"), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and "Job 'plain-quickstart' succeeded" in r.stdout + r.stderr, (r.stdout + r.stderr)[-6000:]
    c, runs = mlflow_runs(db)
    (run,) = runs
    assert run.info.status == "FINISHED" and "test/ndcg_at_10" in run.data.metrics
    assert [m.step for m in c.get_metric_history(run.info.run_id, "train/loss")] == [1, 2]
    assert run.data.tags["rayrec.run_dir"] == str(head.storage / "runs" / "plain")
    assert (head.storage / "runs" / "plain" / "final" / "state.pt").is_file()


@pytest.mark.slow
def test_rayrec_submit_follows_the_job_and_exits_with_its_status(head, tmp_path):
    db = tmp_path / "mlflow.db"
    env = head.env(RAY_AUTH_MODE="disabled", RR_TEST_SECRET=SECRET)  # the token alone is enough
    cmd = [sys.executable, "-m", "rayrec", "submit", "jobs/quickstart.yaml", *TINY, "run.name=submitted",
           "--address", head.dashboard, "--follow", "--no-pip", "--mlflow-uri", f"sqlite:///{db}",
           "--secret-env", "RR_TEST_SECRET"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert re.search(r"job rayrec-quickstart-\d{8}-\d{6}: SUCCEEDED", out) and "final metrics" in out
    assert SECRET not in out
    (run,) = mlflow_runs(db)[1]
    assert run.info.status == "FINISHED" and run.data.tags["rayrec.run_dir"].endswith("runs/submitted")

    bad = subprocess.run([*cmd[:-2], "train.optim.lr=-1", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "train.optim.lr" in bad.stderr
    no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    r = subprocess.run(cmd, cwd=ROOT, env=no_token, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "uses token auth and no token was sent" in r.stderr


# ----------------------------------------------------------------------------- what the upload holds


def _project_with_secrets(root: Path) -> Path:
    """A working dir as users have them: a job, pins, and what must stay home."""
    import shutil

    (root / "jobs").mkdir(parents=True)
    shutil.copy(ROOT / "jobs" / "quickstart.yaml", root / "jobs" / "quickstart.yaml")
    (root / "cluster").mkdir()
    (root / "cluster" / "requirements.txt").write_text("numpy==2.0.0\n")
    files = {".env": "API_KEY=abc", "config/.env.production": "DB=x", ".netrc": "machine m login u password p",
             ".ssh/id_rsa": "key", "credentials.json": "{}", "runs/old/epoch_0001/state.pt": "x" * 1000,
             "mlruns/0/meta.yaml": "x", "tracking.db": "x", "data/big.parquet": "x" * 5000, "notes.txt": "ok",
             "src/model.py": "PASSWORD = os.environ['PASSWORD']\n"}
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / ".rayrecignore").write_text("# data stays on the cluster's storage\ndata/\n")
    return root


def test_the_upload_leaves_secrets_runs_and_ignored_files_home(tmp_path, monkeypatch, capsys):
    from ray._private.runtime_env.packaging import _zip_files

    root = _project_with_secrets(tmp_path / "proj")
    monkeypatch.chdir(root)
    assert main(["submit", "jobs/quickstart.yaml", "--dry-run", "--address", "http://127.0.0.1:1"]) == 0
    out = capsys.readouterr().out
    sub = build_submission(submit_args("jobs/quickstart.yaml"))
    names = {rel for rel, _ in sub.files}
    assert names == {"jobs/quickstart.yaml", "cluster/requirements.txt", "notes.txt", "src/model.py", ".rayrecignore"}
    _zip_files(str(root), sub.runtime_env["excludes"], str(tmp_path / "pkg.zip"), include_gitignore=True)
    import zipfile

    assert set(zipfile.ZipFile(tmp_path / "pkg.zip").namelist()) == names  # the listing is what Ray sends
    assert re.search(r"upload: +5 files, [\d.]+ KiB\n +[\d.]+ KiB +jobs/quickstart.yaml", out), out


def test_a_file_that_looks_like_a_secret_is_refused_unless_included(tmp_path, monkeypatch, capsys, no_send):
    root = _project_with_secrets(tmp_path / "proj")
    (root / "deploy" / "ops.txt").parent.mkdir()
    (root / "deploy" / "ops.txt").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn\n")
    monkeypatch.chdir(root)
    assert main(["submit", "jobs/quickstart.yaml", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "deploy/ops.txt: looks like a secret" in err and "--include deploy/ops.txt" in err and "b3Blbn" not in err
    assert main(["submit", "jobs/quickstart.yaml", "--dry-run", "--include", "deploy/ops.txt",
                 "--include", ".env"]) == 0
    sub = build_submission(submit_args("jobs/quickstart.yaml", "--include", "deploy/ops.txt", "--include", ".env"))
    assert {"deploy/ops.txt", ".env"} <= {rel for rel, _ in sub.files}


def test_a_large_upload_is_warned_about(tmp_path, monkeypatch):
    from rayrec import submit as S

    root = _project_with_secrets(tmp_path / "proj")
    (root / "blob.bin").write_bytes(b"\0" * 3000)
    monkeypatch.chdir(root)
    monkeypatch.setattr(S, "UPLOAD_WARN_MIB", 0.001)
    sub = build_submission(submit_args("jobs/quickstart.yaml"))
    assert any("upload is 0 MiB (over 0.001 MiB)" in w and ".rayrecignore" in w for w in sub.warnings), sub.warnings


def test_every_file_of_the_project_goes_with_a_submission():
    tracked = set(subprocess.check_output(["git", "ls-files"], cwd=ROOT, text=True).split())
    if not tracked:
        pytest.skip("not a git checkout")
    sent = {rel for rel, _ in build_submission(submit_args("jobs/quickstart.yaml")).files}
    assert tracked - sent == set()  # the code the cluster runs is all there (rayrec/secrets.py is code)
