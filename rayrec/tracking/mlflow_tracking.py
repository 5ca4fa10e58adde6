"""MLflow behind one small interface: a ``Tracker`` bound to one run.

The driver opens (or re-opens, after a restart) the run and logs the resolved
config; rank 0 of the workers logs per-epoch metrics into the same run by id.
Only MlflowClient is used, so no global "active run" state leaks between runs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from rayrec.errors import RayrecError
from rayrec.secrets import MASK, mask_text, redact_uri, split_credentials

log = logging.getLogger(__name__)

RUN_KEY_TAG = "rayrec.run_dir"  # identifies one training run across driver restarts
MAX_PARAM_LEN = 6000


def resolve_uri(uri: str, base: Path | None = None) -> str:
    """Make a relative ``sqlite:///x.db`` or plain path absolute (workers have other cwds).

    A URI whose password was masked when stored (``http://bob:***@host``, from a resolved.yaml)
    loses its user and password: MLflow then takes them from ``MLFLOW_TRACKING_USERNAME`` and
    ``MLFLOW_TRACKING_PASSWORD``.
    """
    base = Path(base or Path.cwd())
    if f":{MASK}@" in uri:
        uri = split_credentials(uri)[0]
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{(base / uri[len('sqlite:///'):]).resolve()}"
    if "://" not in uri:
        return (base / uri).resolve().as_uri()
    return uri


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, naming the URI, when the tracking store cannot be used."""
    if uri.startswith(("http://", "https://")):
        import requests

        try:
            requests.get(uri.rstrip("/") + "/health", timeout=timeout).raise_for_status()
        except Exception as e:
            raise RayrecError(f"MLflow tracking URI {redact_uri(uri)} is unreachable ({type(e).__name__}: "
                              f"{mask_text(str(e))}); "
                              "start the server or set tracking.uri (tracking.enabled=false to run without MLflow)") from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        if not os.access(folder if folder.exists() else folder.parent, os.W_OK):
            raise RayrecError(f"MLflow tracking URI {redact_uri(uri)}: folder {folder} is not writable")


_ready: set[str] = set()  # sqlite stores this process has opened (created or migrated) under the lock


def _client(uri: str):
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")  # a Tracker retries a refused write itself
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///") and uri not in _ready:
        return _open_sqlite(uri)
    return MlflowClient(tracking_uri=uri)


def _open_sqlite(uri: str):
    """Open a sqlite store once per process, holding a lock of its path: MLflow creates (or migrates) the
    database on first use, and two processes doing it at once break it (alembic's migration race).
    A store that cannot be opened is one line naming the file and the fix."""
    import fcntl

    from mlflow.tracking import MlflowClient

    path = Path(uri[len("sqlite:///"):])
    path.parent.mkdir(parents=True, exist_ok=True)
    # the lock lives in this host's temp folder, not beside the database (where it would be litter in a project)
    locks = Path(tempfile.gettempdir()) / "rayrec-locks"
    locks.mkdir(exist_ok=True)
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    with open(locks / f"sqlite-{key}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)
        except Exception as e:
            raise RayrecError(store_error(uri, e)) from None
    _ready.add(uri)
    return client


def store_error(uri: str, e: Exception) -> str:
    """One line for a tracking store that cannot be used (at the start of a run)."""
    text = " ".join(str(e).split())
    where = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else redact_uri(uri)
    if "file is not a database" in text or "malformed" in text:
        return (f"MLflow store {where} is not a readable SQLite database (corrupt, or another file): move it aside, "
                "or set tracking.uri to another store (tracking.enabled=false to run without MLflow)")
    if "database is locked" in text:
        return (f"MLflow store {where} stayed locked by another process: wait for it, or use an MLflow server "
                "(`mlflow server`) when many runs log at once")
    return f"MLflow store {where} cannot be used: {_reason(e)}"


NOT_LOGGED = "tracking/not_logged"  # the final metric counting writes that were dropped
NOT_LOGGED_TAG = "rayrec.tracking.not_logged"


class Tracker:
    """Logs to one MLflow run. ``Tracker.null()`` is a do-nothing stand-in (ranks > 0, tracking off).

    Tracking is never why a run dies: a write the store refuses (server down, database locked, disk
    full) goes to a bounded queue that a background thread retries in order; while it is not empty,
    later writes queue behind it, so training does not wait. A write still failing ``max_outage_s``
    after it was made, or pushed out of a full queue, is dropped and counted (``not_logged``), with
    one warning per outage. ``close`` waits a bounded time for the queue.
    """

    MAX_PENDING = 20_000

    def __init__(self, uri: str | None, run_id: str | None, max_outage_s: float | None = None) -> None:
        self.uri, self.run_id = uri, run_id
        self._c = _client(uri) if uri and run_id else None
        self.max_outage_s = float(max_outage_s or 300)  # tracking.max_outage_s
        self.not_logged = 0
        self.last_error: str | None = None
        self._pending: deque[tuple[float, str, Callable[[], Any]]] = deque()
        self._cv = threading.Condition()
        self._worker: threading.Thread | None = None
        self._warned = False
        self.down = False  # the last write failed: reads return nothing at once instead of waiting

    # ------------------------------------------------------------------ writes that never raise

    def _write(self, what: str, fn: Callable[[], Any]) -> None:
        """Do ``fn`` now, or (an outage is on, or it fails) queue it for the background thread."""
        with self._cv:
            queued = bool(self._pending)
            if queued:
                self._enqueue(what, fn)
                return
        try:
            fn()
        except Exception as e:
            self._failed(e)
            with self._cv:
                self._enqueue(what, fn)
            return
        self.down = False

    def _enqueue(self, what: str, fn: Callable[[], Any]) -> None:
        if len(self._pending) >= self.MAX_PENDING:
            self._pending.popleft()
            self._drop(1)
        self._pending.append((time.monotonic(), what, fn))
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._retry, name="rayrec-mlflow-retry", daemon=True)
            self._worker.start()
        self._cv.notify_all()

    def _failed(self, e: Exception) -> None:
        first = self.last_error is None
        self.down = True
        self.last_error = _reason(e)
        if first:
            log.warning("MLflow at %s refused a write (%s); training goes on, writes are retried in the background "
                        "for up to %.0f s (tracking.max_outage_s)", redact_uri(self.uri or ""), self.last_error,
                        self.max_outage_s)

    def _drop(self, n: int) -> None:
        self.not_logged += n
        if not self._warned:
            self._warned = True
            log.warning("MLflow at %s: writes failing for over %.0f s are dropped (%s); the run goes on and its "
                        "summary counts what was not logged", redact_uri(self.uri or ""), self.max_outage_s,
                        self.last_error)

    def _retry(self) -> None:
        delay = 0.5
        while True:
            with self._cv:
                now = time.monotonic()
                while self._pending and now - self._pending[0][0] > self.max_outage_s:
                    self._pending.popleft()
                    self._drop(1)
                if not self._pending:
                    self._cv.notify_all()
                    return
                _, _, fn = self._pending[0]
            try:
                fn()
            except Exception as e:
                self._failed(e)
                with self._cv:
                    self._cv.wait(delay)
                delay = min(delay * 2, 10.0)
                continue
            delay, self.down = 0.5, False
            with self._cv:
                if self._pending and self._pending[0][2] is fn:
                    self._pending.popleft()
                if not self._pending:
                    if self._warned or self.last_error:
                        log.info("MLflow at %s answers again; the queued writes are logged", redact_uri(self.uri or ""))
                    self._warned = False
                    self._cv.notify_all()
                    return

    def close(self, timeout: float = 30.0) -> int:
        """Wait up to ``timeout`` s for queued writes; drop and count what is left. Returns ``not_logged``."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._pending and time.monotonic() < deadline:
                self._cv.wait(min(0.5, max(0.0, deadline - time.monotonic())))
            if self._pending:
                n = len(self._pending)
                self._pending.clear()
                self._drop(n)
        return self.not_logged

    @classmethod
    def null(cls) -> Tracker:
        return cls(None, None)

    @property
    def active(self) -> bool:
        return self._c is not None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(_key(k), float(v), now, step or 0) for k, v in metrics.items() if _is_number(v)]
        for i in range(0, len(batch), 900):
            self._write("metrics", partial(self._c.log_batch, self.run_id, metrics=batch[i : i + 900]))

    def log_params(self, params: dict[str, Any]) -> dict[str, tuple[str, str]]:
        """Log new params; MLflow params cannot change, so for a re-opened run (a resume) a param whose
        value differs is recorded as the tag ``rayrec.changed.<key>`` = ``"old -> new"`` instead.
        Returns those changes."""
        if not self.active:
            return {}
        from mlflow.entities import Param

        existing = self._c.get_run(self.run_id).data.params
        items = [Param(_key(k), str(v)[:MAX_PARAM_LEN]) for k, v in params.items() if _key(k) not in existing]
        for i in range(0, len(items), 90):
            self._c.log_batch(self.run_id, params=items[i : i + 90])
        changed = {k: (existing[_key(k)], str(v)[:MAX_PARAM_LEN]) for k, v in params.items()
                   if _key(k) in existing and existing[_key(k)] != str(v)[:MAX_PARAM_LEN]}
        self.set_tags({f"rayrec.changed.{_key(k)}"[:250]: f"{old} -> {new}"[:5000] for k, (old, new) in changed.items()})
        return changed

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.active and tags:
            from mlflow.entities import RunTag

            batch = [RunTag(k, str(v)) for k, v in tags.items()]
            self._write("tags", partial(self._c.log_batch, self.run_id, tags=batch))

    def tag(self, key: str) -> str | None:
        """A tag of the run (None when unset or tracking is off)."""
        return self._c.get_run(self.run_id).data.tags.get(key) if self.active else None

    def log_text(self, text: str, name: str) -> None:
        if self.active:
            self._write("artifact", partial(self._c.log_text, self.run_id, text, name))

    def log_file(self, path: str | Path, folder: str | None = None) -> None:
        if self.active:
            self._write("artifact", partial(self._c.log_artifact, self.run_id, str(path), folder))

    def log_figure(self, fig, name: str) -> None:
        if self.active:
            folder = Path(tempfile.mkdtemp(prefix="rayrec-figure-"))
            fig.savefig(folder / name, dpi=110, bbox_inches="tight")

            def upload() -> None:
                self._c.log_artifact(self.run_id, str(folder / name))
                shutil.rmtree(folder, ignore_errors=True)

            self._write("artifact", upload)

    def history(self, key: str) -> list[tuple[int, float]]:
        """(step, value) pairs of a metric, in step order ([] while the store does not answer)."""
        if not self.active or self.down:
            return []
        try:
            return sorted((m.step, m.value) for m in self._c.get_metric_history(self.run_id, _key(key)))
        except Exception as e:
            self._failed(e)
            return []

    def finish(self, status: str = "FINISHED", timeout: float = 30.0) -> int:
        """Set the run's end status and wait (at most ``timeout`` s) for queued writes; never raises.
        Returns how many writes were not logged (also tagged on the run, when the store answers)."""
        if not self.active:
            return 0
        self._write("status", partial(self._c.set_terminated, self.run_id, status))
        dropped = self.close(timeout)
        if dropped:
            try:
                self._c.set_tag(self.run_id, NOT_LOGGED_TAG, str(dropped))
            except Exception:
                pass
        return dropped


def _reason(e: Exception) -> str:
    """One short line for why MLflow refused (its messages carry whole URLs and retry dumps)."""
    text = mask_text(" ".join(str(e).split()))
    if "Max retries exceeded" in text or "Connection refused" in text or "timed out" in text.lower():
        return "the tracking server did not answer (connection failed)"
    if "database is locked" in text:
        return "the tracking database is locked"
    if "No space left" in text:
        return "the tracking store's disk is full"
    return f"{type(e).__name__}: {text[:200]}"


def _key(k: str) -> str:
    """MLflow keys allow ``/`` and ``.`` but not ``@``: keep names readable (ndcg_at_10)."""
    return k.replace("@", "_at_")


def mlflow_key(name: str) -> str:
    """The MLflow key of a rayrec metric name (``val/ndcg@10`` -> ``val/ndcg_at_10``)."""
    return _key(name)


def rayrec_name(key: str) -> str:
    """The rayrec metric name of an MLflow key (``val/ndcg_at_10`` -> ``val/ndcg@10``)."""
    return key.replace("_at_", "@")


def metric_history(uri: str, run_id: str, metric: str) -> list[tuple[int, float]]:
    """(epoch, value) of ``metric`` in one run, in epoch order."""
    from mlflow.tracking import MlflowClient

    history = MlflowClient(tracking_uri=uri).get_metric_history(run_id, _key(metric))
    return sorted((m.step, m.value) for m in history)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) or hasattr(v, "item")


def open_run(uri: str, experiment: str, run_dir: str, run_name: str, tags: dict[str, str] | None = None,
             max_outage_s: float | None = None) -> Tracker:
    """Re-open the unfinished run of ``run_dir`` (driver restart) or create a new one."""
    c = _client(uri)
    try:
        exp = c.get_experiment_by_name(experiment)
        if exp is not None and exp.lifecycle_stage == "deleted":
            raise RayrecError(f"MLflow experiment '{experiment}' is deleted in {redact_uri(uri)}: restore it (`mlflow "
                              f"experiments restore --experiment-id {exp.experiment_id}`) or set tracking.experiment "
                              "to another name")
        exp_id = exp.experiment_id if exp else c.create_experiment(experiment)
    except RayrecError:
        raise
    except Exception as e:
        raise RayrecError(store_error(uri, e)) from None
    found = c.search_runs([exp_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_dir}'",
                          order_by=["attributes.start_time DESC"], max_results=1)
    if found and found[0].info.status != "FINISHED":
        run_id = found[0].info.run_id
        c.update_run(run_id, status="RUNNING")
        log.info("continuing MLflow run %s of %s", run_id, run_dir)
    else:
        run_id = c.create_run(exp_id, run_name=run_name, tags={RUN_KEY_TAG: run_dir, **(tags or {})}).info.run_id
        log.info("MLflow run %s in experiment '%s' (%s)", run_id, experiment, redact_uri(uri))
    return Tracker(uri, run_id, max_outage_s)
