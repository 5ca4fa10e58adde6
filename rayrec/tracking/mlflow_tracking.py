"""MLflow behind one small interface: a ``Tracker`` bound to one run.

The driver opens (or re-opens, after a restart) the run and logs the resolved
config; rank 0 of the workers logs per-epoch metrics into the same run by id.
Only MlflowClient is used, so no global "active run" state leaks between runs.
"""

from __future__ import annotations

import logging
import os
import tempfile
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


def _client(uri: str):
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


class Tracker:
    """Logs to one MLflow run. ``Tracker.null()`` is a do-nothing stand-in (ranks > 0, tracking off)."""

    def __init__(self, uri: str | None, run_id: str | None) -> None:
        self.uri, self.run_id = uri, run_id
        self._c = _client(uri) if uri and run_id else None

    @classmethod
    def null(cls) -> Tracker:
        return cls(None, None)

    @property
    def active(self) -> bool:
        return self._c is not None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.active:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(_key(k), float(v), now, step or 0) for k, v in metrics.items() if _is_number(v)]
        for i in range(0, len(batch), 900):
            self._c.log_batch(self.run_id, metrics=batch[i : i + 900])

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
        if self.active:
            for k, v in tags.items():
                self._c.set_tag(self.run_id, k, str(v))

    def tag(self, key: str) -> str | None:
        """A tag of the run (None when unset or tracking is off)."""
        return self._c.get_run(self.run_id).data.tags.get(key) if self.active else None

    def log_text(self, text: str, name: str) -> None:
        if self.active:
            self._c.log_text(self.run_id, text, name)

    def log_file(self, path: str | Path, folder: str | None = None) -> None:
        if self.active:
            self._c.log_artifact(self.run_id, str(path), folder)

    def log_figure(self, fig, name: str) -> None:
        if self.active:
            with tempfile.TemporaryDirectory() as d:
                p = Path(d) / name
                fig.savefig(p, dpi=110, bbox_inches="tight")
                self._c.log_artifact(self.run_id, str(p))

    def history(self, key: str) -> list[tuple[int, float]]:
        """(step, value) pairs of a metric, in step order."""
        if not self.active:
            return []
        return sorted((m.step, m.value) for m in self._c.get_metric_history(self.run_id, _key(key)))

    def finish(self, status: str = "FINISHED") -> None:
        if self.active:
            self._c.set_terminated(self.run_id, status)


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


def open_run(uri: str, experiment: str, run_dir: str, run_name: str, tags: dict[str, str] | None = None) -> Tracker:
    """Re-open the unfinished run of ``run_dir`` (driver restart) or create a new one."""
    c = _client(uri)
    exp = c.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else c.create_experiment(experiment)
    found = c.search_runs([exp_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_dir}'",
                          order_by=["attributes.start_time DESC"], max_results=1)
    if found and found[0].info.status != "FINISHED":
        run_id = found[0].info.run_id
        c.update_run(run_id, status="RUNNING")
        log.info("continuing MLflow run %s of %s", run_id, run_dir)
    else:
        run_id = c.create_run(exp_id, run_name=run_name, tags={RUN_KEY_TAG: run_dir, **(tags or {})}).info.run_id
        log.info("MLflow run %s in experiment '%s' (%s)", run_id, experiment, redact_uri(uri))
    return Tracker(uri, run_id)
