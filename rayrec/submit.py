"""`rayrec submit`: run a job on a Ray cluster through the Ray Job Submission SDK.

What it sends is what `ray job submit --working-dir . -- rayrec train JOB` would send, plus:

- a runtime env with the pinned requirements (``cluster/requirements.txt``), so the cluster
  runs the versions the job was tested with; ``--no-pip`` when the image already has them;
- the MLflow URI (``--mlflow-uri`` or ``$MLFLOW_TRACKING_URI``) as ``tracking.uri`` and as
  ``MLFLOW_TRACKING_URI``, so the run lands on the team server, not in the job's temporary dir;
- secrets named by ``--secret-env NAME``: the value is read from this shell and never printed
  or written to a file (the job YAML has no place for one);
- a submission id derived from the job and the time (``rayrec-quickstart-20250101-120000``).

Everything that can be checked here is checked before anything is sent: the address answers,
the job file exists inside the working dir and validates, the secrets are set.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

from rayrec.errors import SubmitError
from rayrec.secrets import looks_like_key, mask_text, redact_uri, secret_name, split_credentials

log = logging.getLogger(__name__)

LOCK_FILE = Path("cluster/requirements.txt")
#: Commands that take a job (or search-space) file as their first argument.
JOB_COMMANDS = ("train", "eval", "tune", "sft", "grpo")
#: The kind of job file (``rayrec.config.kinds``) each job command runs.
JOB_KINDS = {"train": "sequential", "eval": "sequential", "sft": "genrec", "grpo": "grpo"}
#: Never uploaded with the working dir (gitignore patterns; Ray also skips what ``.gitignore`` and
#: ``.rayignore`` name, and rayrec what ``.rayrecignore`` names). ``--include PATTERN`` takes one back.
SECRET_EXCLUDES = [".env", ".env.*", "*.env", "*.pem", "*.key", "*.p12", "*.pfx", "id_rsa*", "id_dsa*", "id_ecdsa*",
                   "id_ed25519*", ".ssh/", ".aws/", ".gnupg/", ".netrc", ".pgpass", ".git-credentials", ".pypirc",
                   "credentials*.json", "*credentials*.json", "service-account*.json", "*.keytab"]
RUN_EXCLUDES = [".git", "**/__pycache__", ".venv/", "venv/", "runs/", "mlruns/", "mlartifacts/", "ray_results/",
                "*.db", "*.db-journal", "state.pt", ".rayrec.lock"]
UPLOAD_EXCLUDES = RUN_EXCLUDES + SECRET_EXCLUDES
IGNORE_FILE = ".rayrecignore"
UPLOAD_WARN_MIB = 100  # Ray refuses a working dir above 500 MiB; far less is usual for code and job files
#: What marks a file's text as a secret (a private key, a cloud key id, KEY=value of a secret-named variable)
SECRET_TEXT = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b|"
                         r"^\s*(?:export\s+)?[A-Z0-9_]*(?:SECRET|TOKEN|PASSWORD|PASSWD|API_KEY|ACCESS_KEY)[A-Z0-9_]*"
                         r"\s*[=:]\s*['\"]?[^\s'\"$<{]{8,}", re.M)
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@dataclass
class Submission:
    """Everything sent to the cluster. ``secrets`` are names only; their values sit in
    ``runtime_env['env_vars']`` and ``describe()`` masks them."""

    entrypoint: str
    runtime_env: dict
    submission_id: str
    metadata: dict[str, str] = field(default_factory=dict)
    secrets: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    files: list[tuple[str, int]] = field(default_factory=list)  # what the working dir upload holds

    def describe(self) -> str:
        env = {k: ("<secret>" if k in self.secrets else redact_uri(v))
               for k, v in self.runtime_env.get("env_vars", {}).items()}
        pip = self.runtime_env.get("pip", {}).get("packages", [])
        return "\n".join([
            f"submission id: {self.submission_id}",
            f"entrypoint:    {mask_text(self.entrypoint)}",
            f"working dir:   {self.runtime_env['working_dir']}",
            f"pip:           {len(pip)} pinned requirements" if pip else "pip:           (none: the cluster image provides them)",
            "env vars:      " + (", ".join(f"{k}={v}" for k, v in env.items()) or "-"),
            *self.upload_lines(),
        ])

    def upload_lines(self, largest: int = 5) -> list[str]:
        total = sum(size for _, size in self.files)
        big = sorted(self.files, key=lambda f: -f[1])[:largest]
        return [f"upload:        {len(self.files)} files, {_size(total)}",
                *(f"  {_size(size):>10}  {rel}" for rel, size in big)]


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def normalize_address(address: str | None) -> str:
    """``HEAD:8265`` -> ``http://HEAD:8265``; the address must be the dashboard's (job API)."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError("no cluster address: pass --address http://HEAD:8265 (or set RAY_ADDRESS)")
    if address.startswith("ray://") or ":10001" in address:
        raise SubmitError(f"{address} is a Ray Client address; the job API is the dashboard's, e.g. http://HEAD:8265")
    return address.rstrip("/") if "://" in address else f"http://{address.rstrip('/')}"


def auth_headers(token_env: str) -> dict[str, str]:
    """``Authorization`` header from the token in ``$token_env`` (Ray >= 2.59 token auth), if set."""
    token = os.environ.get(token_env, "").strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def check_address(address: str, headers: dict[str, str], timeout: float = 5.0) -> None:
    """Fail with one message unless ``address`` is a Ray dashboard that accepts us."""
    import requests

    try:
        r = requests.get(f"{address}/api/version", headers=headers, timeout=timeout)
    except requests.RequestException as e:
        raise SubmitError(f"cannot reach the Ray dashboard at {address} ({type(e).__name__}); check --address "
                          "(http://HEAD:8265), that the cluster is up, and any port-forward or SSH tunnel") from None
    if r.status_code == 401:
        raise SubmitError(f"the cluster at {address} uses token auth and no token was sent: export RAY_AUTH_TOKEN "
                          "(print it on the head with `ray get-auth-token`) or name its variable with --auth-token-env")
    if r.status_code == 403:
        raise SubmitError(f"the cluster at {address} rejected the auth token; check RAY_AUTH_TOKEN against the head's")
    if r.status_code != 200:
        raise SubmitError(f"{address} answered HTTP {r.status_code} to /api/version; is it the Ray dashboard (port 8265)?")


def job_path(job: Path, working_dir: Path) -> str:
    """The job file relative to the working dir (the cluster sees only the uploaded copy)."""
    if not job.is_file():
        raise SubmitError(f"{job}: no such job file")
    try:
        return job.resolve().relative_to(working_dir.resolve()).as_posix()
    except ValueError:
        raise SubmitError(f"{job} is outside the working dir {working_dir}; the cluster only sees files "
                          "uploaded with it (run from the project root or pass --working-dir)") from None


def validate_job(command: str, job: Path, overrides: list[str]) -> list[str]:
    """Load the job here, so a bad key (or a job of another kind) fails before the upload, not on the cluster.

    Returns warnings about settings that work locally but not on a cluster.
    """
    if command not in JOB_KINDS:
        return []
    from rayrec.config.kinds import kind_named, load_job_file

    cfg = load_job_file(job, overrides, expect=(kind_named(JOB_KINDS[command]),))
    uri = cfg.tracking.uri
    if cfg.tracking.enabled and not uri.startswith(("http://", "https://", "databricks")):
        return [f"tracking.uri is {uri}, a local store: on the cluster it lands in the job's temporary working "
                "dir (and a GPU node's worker cannot write it); pass --mlflow-uri or set MLFLOW_TRACKING_URI"]
    return []


def env_vars(plain: list[str], secrets: list[str], mlflow_uri: str | None) -> dict[str, str]:
    """Runtime-env variables: ``NAME=VALUE`` pairs, secrets copied from this shell, the MLflow URI."""
    out = {"PYTHONUNBUFFERED": "1"}  # driver output reaches `--follow` line by line
    if mlflow_uri:
        out["MLFLOW_TRACKING_URI"] = mlflow_uri
    for item in plain:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SubmitError(f"--env '{item}' is not NAME=VALUE")
        if secret_name(name) or looks_like_key(value) or redact_uri(value) != value:
            raise SubmitError(f"--env {name}=... looks like a secret (its value is not shown); export it and pass it "
                              f"by name with --secret-env {name}, so its value stays out of command lines, shell "
                              "history and logs")
        out[name] = value
    for name in secrets:
        if name not in os.environ:
            raise SubmitError(f"--secret-env {name}: {name} is not set in this shell; export it first")
        out[name] = os.environ[name]
    return out


def pinned_requirements(path: Path) -> list[str]:
    """Requirement lines of the lock file (comments and blanks dropped)."""
    if not path.is_file():
        raise SubmitError(f"{path}: no pinned requirements file; pass --requirements FILE, or --no-pip "
                          "when the cluster image already has rayrec's dependencies")
    lines = [ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines()]
    return [ln for ln in lines if ln]


def submission_id(job: Path, now: float | None = None) -> str:
    """``rayrec-<job name>-<UTC yyyymmdd-hhmmss>``: readable in `ray job list`, unique per second."""
    stem = re.sub(r"[^a-z0-9]+", "-", job.stem.lower()).strip("-") or "job"
    return f"rayrec-{stem}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(now))}"


def build_submission(args: argparse.Namespace) -> Submission:
    """The entrypoint and runtime env for ``args``; raises ``SubmitError`` on anything missing."""
    working_dir = Path(args.working_dir)
    if not working_dir.is_dir():
        raise SubmitError(f"--working-dir {working_dir}: no such folder")
    rel = job_path(args.job, working_dir)
    command, *flags = shlex.split(args.command)
    overrides = list(args.overrides)
    mlflow_uri = args.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if mlflow_uri and not any(o.startswith("tracking.uri=") for o in overrides):
        overrides.append(f"tracking.uri={mlflow_uri}")
    # a user and password in a tracking URI travel as MLflow's own variables, sent as secrets, never in
    # the entrypoint that `ray job list` and the dashboard show
    credentials: dict[str, str] = {}
    for i, o in enumerate(overrides):
        if o.startswith("tracking.uri="):
            uri, found = split_credentials(o.partition("=")[2])
            overrides[i], credentials = f"tracking.uri={uri}", {**credentials, **found}
    if mlflow_uri:
        mlflow_uri, found = split_credentials(mlflow_uri)
        credentials = {**found, **credentials}
    warnings = validate_job(command, args.job, overrides)
    env = {**env_vars(args.env, args.secret_env, mlflow_uri), **credentials}
    excludes = upload_excludes(working_dir, getattr(args, "include", []))
    files = upload_files(working_dir, excludes)
    check_no_secrets(working_dir, files, getattr(args, "include", []))
    runtime_env = {"working_dir": str(working_dir.resolve()), "excludes": excludes, "env_vars": env}
    if not args.no_pip:
        lock = args.requirements or working_dir / LOCK_FILE
        runtime_env["pip"] = {"packages": pinned_requirements(lock), "pip_check": False}
    # `python -m` runs the uploaded rayrec with the runtime env's interpreter (its pinned packages)
    entrypoint = shlex.join(["python", "-m", "rayrec", command, rel, *overrides, *flags])
    meta = {"rayrec.job": rel, "rayrec.command": args.command, "rayrec.user": getpass.getuser()}
    total = sum(size for _, size in files)
    if total > UPLOAD_WARN_MIB * 2**20:
        warnings.append(f"the working dir upload is {total / 2**20:.0f} MiB (over {UPLOAD_WARN_MIB} MiB); list data, "
                        f"runs or large files in {IGNORE_FILE} (gitignore patterns), or pass a smaller --working-dir")
    return Submission(entrypoint, runtime_env, args.submission_id or submission_id(args.job), meta,
                      list(args.secret_env) + sorted(credentials), warnings, files)


def upload_excludes(working_dir: Path, include: list[str]) -> list[str]:
    """What Ray is told to leave out: run/tracking folders, secrets, ``.rayrecignore``; then ``include``
    patterns as negations (the last matching pattern decides, as in ``.gitignore``)."""
    extra = []
    ignore = working_dir / IGNORE_FILE
    if ignore.is_file():
        extra = [ln.rstrip("\n") for ln in ignore.read_text(encoding="utf-8").splitlines()
                 if ln.strip() and not ln.lstrip().startswith("#")]
    return UPLOAD_EXCLUDES + extra + [f"!{p}" for p in include]


def upload_files(working_dir: Path, excludes: list[str]) -> list[tuple[str, int]]:
    """(path, bytes) of every file Ray will upload: its own walk of the working dir, with these excludes
    and the ``.gitignore``/``.rayignore`` files it reads (so the listing is what is sent)."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    root = working_dir.resolve()
    found: list[tuple[str, int]] = []

    def add(path: Path) -> None:
        if path.is_file():
            found.append((path.relative_to(root).as_posix(), path.stat().st_size))

    include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    quiet = logging.getLogger(f"{__name__}.upload")  # Ray's walk logs each ignore file it reads at INFO
    quiet.setLevel(logging.WARNING)
    _dir_travel(root, [_get_excludes(root, excludes)], add, include_gitignore=include_gitignore, logger=quiet)
    return sorted(found)


def check_no_secrets(working_dir: Path, files: list[tuple[str, int]], include: list[str]) -> None:
    """Refuse to upload a file whose text looks like a secret, unless ``--include`` names it."""
    from fnmatch import fnmatch

    flagged = []
    for rel, size in files:
        if size > 1_000_000 or rel.endswith((".py", ".md", ".ipynb")) or any(fnmatch(rel, p) for p in include):
            continue
        try:
            text = (working_dir / rel).read_text(encoding="utf-8", errors="ignore")
        except OSError:
            continue
        if SECRET_TEXT.search(text):
            flagged.append(rel)
    if flagged:
        raise SubmitError(f"{', '.join(flagged[:5])}{' ...' if len(flagged) > 5 else ''}: looks like a secret (a "
                          f"private key, a cloud key or a KEY=value of a secret); it is not uploaded: add it to "
                          f"{IGNORE_FILE}, or pass --include {flagged[0]} if it must go with the job")


def send(sub: Submission, address: str, headers: dict[str, str]):
    """Upload the working dir and submit; returns the client (to follow the job)."""
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(address, headers=headers)
        client.submit_job(entrypoint=sub.entrypoint, runtime_env=sub.runtime_env,
                          submission_id=sub.submission_id, metadata=sub.metadata)
    except Exception as e:  # the SDK raises RuntimeError/ConnectionError with the server's text
        reason = " ".join(str(e).split())[:400]
        raise SubmitError(f"the cluster at {address} did not accept the job: {reason}") from None
    return client


def follow(client, sid: str) -> str:
    """Print the job's output as it comes, then return its final status."""
    async def stream() -> None:
        async for chunk in client.tail_job_logs(sid):
            print(chunk, end="", flush=True)

    try:
        asyncio.run(stream())
    except RuntimeError as e:  # the log stream closed early (head restart, proxy timeout)
        log.warning("log stream of %s ended early (%s); waiting for the job's status", sid, e)
    return wait_status(client, sid)


def wait_status(client, sid: str, poll_s: float = 1.0) -> str:
    """Poll until the job is SUCCEEDED, FAILED or STOPPED."""
    while True:
        status = client.get_job_status(sid)
        status = getattr(status, "value", str(status))
        if status in TERMINAL:
            return status
        time.sleep(poll_s)


def check_command(command: str, commands: dict) -> None:
    """``--command`` must be a job command this rayrec has (the cluster runs the same code).

    ``commands``: the ``rayrec`` parser's subcommands (set by ``add_commands``), so this module
    needs no import of the CLI.
    """
    if command not in commands:
        have = ", ".join(c for c in JOB_COMMANDS if c in commands)
        raise SubmitError(f"--command {command}: rayrec has no such command here (job commands: {have})")
