"""`rayrec submit`: run a job on a Ray cluster (``rayrec.submit`` builds, checks and sends it)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rayrec import submit as S


def add_commands(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("submit", help="run a job on a Ray cluster (Ray Job Submission SDK)",
                       description=S.__doc__.split("\n\n")[0])
    s.add_argument("job", type=Path, help="job YAML inside the working dir, e.g. jobs/quickstart.yaml")
    s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. scaling.num_workers=8 scaling.use_gpu=true")
    s.add_argument("--address", help="the cluster's dashboard, http://HEAD:8265 (default: $RAY_ADDRESS)")
    s.add_argument("--follow", action="store_true", help="stream the job's logs and exit with its status")
    s.add_argument("--command", default="train",
                   help='rayrec command run on the cluster, with its flags: "train" (default), "sft --eval"')
    s.add_argument("--mlflow-uri", help="team MLflow server for the run (default: $MLFLOW_TRACKING_URI)")
    s.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="job env var (repeatable)")
    s.add_argument("--secret-env", action="append", default=[], metavar="NAME",
                   help="copy $NAME from this shell into the job's env, never printed (repeatable)")
    s.add_argument("--requirements", type=Path, help=f"pinned pip requirements (default: WORKING_DIR/{S.LOCK_FILE})")
    s.add_argument("--no-pip", action="store_true", help="no pip runtime env: the cluster image has the deps")
    s.add_argument("--working-dir", default=".", help="folder uploaded as the job's working dir (default: .)")
    s.add_argument("--include", action="append", default=[], metavar="PATTERN",
                   help="upload files matching PATTERN although they are excluded or look like a secret (repeatable)")
    s.add_argument("--submission-id", help="job id (default: rayrec-<job>-<UTC time>)")
    s.add_argument("--auth-token-env", default="RAY_AUTH_TOKEN", metavar="NAME",
                   help="env var holding the cluster's auth token (default: RAY_AUTH_TOKEN)")
    s.add_argument("--dry-run", action="store_true", help="print what would be submitted and stop")
    s.set_defaults(func=cmd_submit, commands=sub.choices)  # filled as the other commands are added


def cmd_submit(args: argparse.Namespace) -> int:
    """Check everything, submit, and with ``--follow`` stream the logs and return the job's status."""
    S.check_command(args.command.split()[0] if args.command.strip() else "", args.commands)
    sub = S.build_submission(args)
    if args.dry_run:
        for warning in sub.warnings:
            S.log.warning(warning)
        print(sub.describe())
        return 0
    address = S.normalize_address(args.address)
    headers = S.auth_headers(args.auth_token_env)
    S.check_address(address, headers)
    for warning in sub.warnings:
        S.log.warning(warning)
    client = S.send(sub, address, headers)
    print(sub.describe())
    sid = sub.submission_id
    print(f"\nfollow:  ray job logs {sid} --address {address} --follow\nstop:    ray job stop {sid} --address {address}")
    if not args.follow:
        return 0
    try:
        status = S.follow(client, sid)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {sid} keeps running (ray job stop {sid} --address {address})")
        return 130
    print(f"\njob {sid}: {status}")
    return 0 if status == "SUCCEEDED" else 1
