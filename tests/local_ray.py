"""A real Ray head for end-to-end tests: 127.0.0.1 only, free ports, its own temp dir.

``ray start --head --block`` runs as a child of the test in a new session, so every Ray
process of this head (GCS, raylet, dashboard, workers, job drivers) is a descendant of it or
in its process group. ``stop()`` ends exactly those, by PID; it never runs ``ray stop``, which
would kill every Ray process on the machine, other sessions' included.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

BIN = Path(sys.executable).parent
PORT_FLAGS = ["--port", "--dashboard-port", "--ray-client-server-port", "--node-manager-port",
              "--object-manager-port", "--runtime-env-agent-port", "--dashboard-agent-grpc-port",
              "--dashboard-agent-listen-port", "--metrics-export-port"]


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 right now."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class LocalHead:
    """One Ray head node. ``env`` is added to the head's environment (auth, storage root)."""

    def __init__(self, num_cpus: int = 3, env: dict[str, str] | None = None) -> None:
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rr", dir="/tmp"))  # short: socket paths are limited
        self.ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
        self.num_cpus, self.extra_env = num_cpus, dict(env or {})
        self.proc: subprocess.Popen | None = None

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.ports['--port']}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.ports['--dashboard-port']}"

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for processes of this test (the head, drivers, `ray job submit`)."""
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # only what ``extra`` says
        env.update({"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
                    "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "300",  # a loaded CI box can need more than Ray's 60 s
                    # the state API of this head's processes must not wander to other Ray instances on the host
                    "RAY_API_SERVER_ADDRESS": self.dashboard})
        return {**env, **self.extra_env, **extra}

    def start(self, timeout: float = 360.0, attempts: int = 3) -> LocalHead:
        """Start the head; a loaded machine can miss Ray's fixed 30 s raylet deadline, so retry."""
        for attempt in range(1, attempts + 1):
            try:
                self._launch()
                self._wait_ready(timeout)
                return self
            except (RuntimeError, TimeoutError):
                self.stop(keep_logs=attempt == attempts)
                if attempt == attempts:
                    raise
                self.temp_dir = Path(tempfile.mkdtemp(prefix="rr", dir="/tmp"))
                self.ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
        return self

    def _launch(self) -> None:
        cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
               "--dashboard-host", "127.0.0.1", "--include-dashboard", "true", "--disable-usage-stats",
               "--min-worker-port", "0", "--max-worker-port", "0", "--num-cpus", str(self.num_cpus),
               "--num-gpus", "0", "--object-store-memory", str(200 * 1024**2), "--temp-dir", str(self.temp_dir)]
        for flag, port in self.ports.items():
            cmd += [flag, str(port)]
        log = open(self.temp_dir / "ray_start.log", "wb")
        self.proc = subprocess.Popen(cmd, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def _wait_ready(self, timeout: float) -> None:
        """Until `ray start` reports success, the job API answers and the head's dashboard agent
        (which runs jobs) listens."""
        deadline = time.monotonic() + timeout
        headers = self.auth_headers()
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                ok = "Ray runtime started" in self.log_tail(10**6)
                ok = ok and requests.get(f"{self.dashboard}/api/jobs/", headers=headers, timeout=5).status_code == 200
                if ok and _listening(self.ports["--dashboard-agent-listen-port"]):
                    time.sleep(2)  # the agent registers its address right after it starts listening
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        raise TimeoutError(f"Ray head not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def auth_headers(self) -> dict[str, str]:
        token = self.extra_env.get("RAY_AUTH_TOKEN")
        return {"Authorization": f"Bearer {token}"} if token else {}

    def log_tail(self, n: int = 4000) -> str:
        p = self.temp_dir / "ray_start.log"
        return p.read_text(errors="replace")[-n:] if p.exists() else ""

    def check(self) -> None:
        """Raise with the head's log when it is gone (something else ended its processes)."""
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"the Ray head exited ({self.proc.returncode}); logs kept in {self.temp_dir}:\n"
                               f"{self.log_tail()}")

    def stop(self, grace: float = 5.0, keep_logs: bool | None = None) -> None:
        """End this head's processes (descendants and its process group), by PID.

        The temp dir (logs) is kept when the head had already exited: that needs explaining.
        """
        if self.proc is None:
            return
        import psutil

        died = self.proc.poll() is not None if keep_logs is None else keep_logs

        procs = self._processes(psutil)
        for p in procs:
            _signal(p, signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=grace)
        for p in alive + self._processes(psutil):
            _signal(p, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=5)
        self.proc.wait(timeout=10)
        self.proc = None
        if not died:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _processes(self, psutil) -> list:
        """The `ray start` process, its descendants, and whatever else is in its process group."""
        found = {}
        try:
            root = psutil.Process(self.proc.pid)
            for p in [root, *root.children(recursive=True)]:
                found[p.pid] = p
        except psutil.NoSuchProcess:
            pass
        for p in psutil.process_iter():
            try:
                if os.getpgid(p.pid) == self.proc.pid:
                    found[p.pid] = p
            except (ProcessLookupError, psutil.Error):
                pass
        return list(found.values())


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except OSError:
        return False


def _signal(p, sig: int) -> None:
    try:
        p.send_signal(sig)
    except Exception:  # already gone
        pass


def raise_interrupt_on_sigterm():
    """Make SIGTERM (a CI timeout) unwind like Ctrl-C, so fixtures still tear the head down."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    return signal.signal(signal.SIGTERM, handler)


class WorkerNode(LocalHead):
    """One more Ray node of ``head``'s cluster on this host (``ray start --address``): its own temp dir and
    ports, ``resources`` (e.g. ``{"node_a": 1}``) to place work on it, and ``kill()`` to lose it at once.

    ``private_tmpfs``: the node runs in a mount namespace of its own (``unshare -m``) with an empty tmpfs
    over that folder, so it sees other files there than the driver does (a disk no other node mounts).
    """

    def __init__(self, head: LocalHead, num_cpus: int = 1, resources: dict[str, float] | None = None,
                 private_tmpfs: Path | None = None) -> None:
        super().__init__(num_cpus=num_cpus, env=head.extra_env)
        self.head, self.resources, self.private_tmpfs = head, dict(resources or {}), private_tmpfs
        self.ports = dict(zip(NODE_PORT_FLAGS, free_ports(len(NODE_PORT_FLAGS))))

    def env(self, **extra: str) -> dict[str, str]:
        return self.head.env(**extra)

    def _launch(self) -> None:
        import json

        cmd = [str(BIN / "ray"), "start", "--address", self.head.gcs_address, "--block", "--node-ip-address",
               "127.0.0.1", "--disable-usage-stats", "--min-worker-port", "0", "--max-worker-port", "0",
               "--num-cpus", str(self.num_cpus), "--num-gpus", "0", "--object-store-memory", str(100 * 1024**2),
               "--resources", json.dumps(self.resources), "--temp-dir", str(self.temp_dir)]
        for flag, port in self.ports.items():
            cmd += [flag, str(port)]
        if self.private_tmpfs is not None:
            inner = " ".join(f"'{c}'" for c in cmd)
            cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                   f"mount -t tmpfs rayrec-test '{self.private_tmpfs}' && exec {inner}"]
        log = open(self.temp_dir / "ray_start.log", "wb")
        self.proc = subprocess.Popen(cmd, env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start (worker node) exited {self.proc.returncode}:\n{self.log_tail()}")
            if "Ray runtime started" in self.log_tail(10**6):
                time.sleep(2)  # the raylet registers with the GCS right after
                return
            time.sleep(0.5)
        raise TimeoutError(f"Ray worker node not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def kill(self) -> None:
        """Lose the node at once: SIGKILL to its raylet, its workers and everything in its process group."""
        import psutil

        for p in self._processes(psutil):
            _signal(p, signal.SIGKILL)


NODE_PORT_FLAGS = ["--node-manager-port", "--object-manager-port", "--runtime-env-agent-port",
                   "--dashboard-agent-grpc-port", "--dashboard-agent-listen-port", "--metrics-export-port"]
