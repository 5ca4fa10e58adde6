"""One owner per run folder: a lock with the owner's pid, host and a heartbeat.

``rayrec train`` (or a sweep trial, or the driver of a Ray job) holds ``RUN/.rayrec.lock`` for
as long as it trains the run. The kernel's ``flock`` drops the lock of a process that dies, so a
crashed run is taken over by its re-run on the same host at once. On storage shared between
hosts (NFS), where ``flock`` may not reach across machines, the file also names the owner's
host and is touched every ``HEARTBEAT_S``: a lock of another host whose heartbeat is fresh
refuses, a stale one (its host died) is taken over with a warning.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from rayrec.errors import RayrecError

log = logging.getLogger(__name__)

LOCK_FILE = ".rayrec.lock"
HEARTBEAT_S = 30.0
STALE_S = 4 * HEARTBEAT_S


class RunBusyError(RayrecError):
    """Another live process trains this run."""


def _owner(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _busy_message(name: str, owner: dict) -> str:
    who = f"PID {owner.get('pid', '?')} on {owner.get('host', '?')}"
    return (f"run {name} is being trained by {who} since {owner.get('since', '?')}; pick another run.name "
            "or wait for it to finish")


@contextmanager
def hold_run(run_dir: Path) -> Iterator[None]:
    """Own ``run_dir`` for the block, or raise ``RunBusyError`` naming the live owner."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunBusyError(_busy_message(run_dir.name, _owner(path))) from None
    try:
        _check_other_host(run_dir, path)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": datetime.now(timezone.utc).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(path, stop), name="rayrec-run-lock", daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        os.ftruncate(fd, 0)  # released: nobody owns it (the file stays, an empty lock is free)
        os.close(fd)


def _check_other_host(run_dir: Path, path: Path) -> None:
    """``flock`` was ours, which settles it on this host; a lock of another host (shared storage, where
    ``flock`` may not reach across machines) whose heartbeat is fresh still refuses."""
    owner = _owner(path)
    if not owner.get("pid"):
        return
    age = time.time() - path.stat().st_mtime
    if owner.get("host") != socket.gethostname() and age < STALE_S:
        raise RunBusyError(_busy_message(run_dir.name, owner) + f" (heartbeat {age:.0f} s ago)")
    log.warning("taking over run %s from PID %s on %s, which is gone (last heartbeat %.0f s ago)",
                run_dir.name, owner.get("pid"), owner.get("host"), age)


def _heartbeat(path: Path, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        try:
            os.utime(path)
        except OSError:
            pass
