"""The `rayrec train` recipe: check -> data -> tracking -> train (Ray or local) -> report.

Everything that can fail cheaply (config, paths, MLflow, cluster size) is checked
before a single worker starts.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rayrec.config.loader import dump_job, flatten
from rayrec.config.schema import JobConfig
from rayrec.data.dataset import Prepared, ensure_prepared
from rayrec.errors import RayrecError
from rayrec.tracking.mlflow_tracking import Tracker, check_reachable, open_run, resolve_uri
from rayrec.tracking.plots import learning_curves
from rayrec.train.worker import DataInfo

log = logging.getLogger(__name__)

COMPLETE_MARKER = ".rayrec_complete"


@dataclass
class Outcome:
    metrics: dict[str, float]
    run_dir: Path
    checkpoint: str | None = None
    mlflow_run_id: str | None = None
    history: list[dict[str, float]] = field(default_factory=list)


def check_storage(path: Path) -> Path:
    """The storage folder must be creatable and writable before any worker starts."""
    path = path.expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RayrecError(f"run.storage_path {path} cannot be created: {e.strerror}") from None
    if not os.access(path, os.W_OK):
        raise RayrecError(f"run.storage_path {path} is not writable")
    return path


def pick_run_dir(storage: Path, name: str) -> Path:
    """``storage/name``, or the next ``name_vN`` if that run already completed.

    An unfinished run folder is reused, so re-running after a crash resumes it.
    """
    candidate, n = storage / name, 1
    while (candidate / COMPLETE_MARKER).exists():
        n += 1
        candidate = storage / f"{name}_v{n}"
    return candidate


def data_info(ds: Prepared) -> DataInfo:
    return DataInfo(path=str(ds.path.resolve()), num_items=ds.num_items,
                    train_rows=int(ds.manifest["counts"]["train_users"]),
                    seen_len=max(ds.max_history("valid"), ds.max_history("test")))


def open_tracking(cfg: JobConfig, run_dir: Path, source: str | None) -> Tracker:
    if not cfg.tracking.enabled:
        return Tracker.null()
    uri = resolve_uri(cfg.tracking.uri)
    check_reachable(uri)
    tracker = open_run(uri, cfg.tracking.experiment, str(run_dir), run_dir.name,
                       tags={"rayrec.model": cfg.model.name, "rayrec.job_file": source or ""})
    tracker.log_params(flatten(cfg))
    tracker.log_text(dump_job(cfg), "config/resolved.yaml")
    return tracker


def run_training(cfg: JobConfig, *, local: bool = False, source: str | None = None,
                 resume_from: str | None = None, callbacks: list | None = None) -> Outcome:
    """Train ``cfg`` end to end and return its final metrics."""
    from rayrec.train.cluster import shared_paths

    cfg = shared_paths(cfg)  # on a cluster: data and checkpoints on its shared storage
    storage = check_storage(cfg.run.storage_path)
    ds = ensure_prepared(cfg.data)
    info = data_info(ds)
    features = _joint_features(cfg, ds, local)
    run_dir = pick_run_dir(storage, cfg.run.name)
    tracker = open_tracking(cfg, run_dir, source)
    tracker.log_file(ds.path / "manifest.json", "data")
    if features is not None:
        tracker.log_text(json.dumps(features, indent=2), "data/features.json")
    try:
        if local or cfg.model.name == "popularity":
            outcome = _train_local(cfg, ds, info, run_dir, tracker, resume_from)
        else:
            outcome = _train_ray(cfg, info, run_dir, tracker, resume_from, callbacks)
    except BaseException:
        tracker.finish("FAILED")
        raise
    _finish(tracker, outcome)
    (run_dir / COMPLETE_MARKER).write_text(outcome.mlflow_run_id or "")
    return outcome


def _joint_features(cfg: JobConfig, ds: Prepared, local: bool) -> dict[str, Any] | None:
    """ur4rec: compute (or find up to date) its features on the driver, before any worker starts."""
    if cfg.model.name != "ur4rec":
        return None
    from rayrec.train.joint import prepare_features

    if not local:
        from rayrec.train.cluster import ensure_ray

        ensure_ray()
    return prepare_features(cfg, ds.path, use_ray=not local)


def _train_local(cfg, ds, info, run_dir, tracker, resume_from) -> Outcome:
    from rayrec.train.checkpoint import latest_checkpoint
    from rayrec.train.local import run_local

    run_dir.mkdir(parents=True, exist_ok=True)
    resume_from = resume_from or latest_checkpoint(run_dir)  # a re-run after a crash continues
    final, rep = run_local(cfg, ds, info, run_dir=run_dir, tracker=tracker, resume_from=resume_from)
    return Outcome(final, run_dir, str(rep.last_checkpoint) if rep.last_checkpoint else None,
                   tracker.run_id, rep.metrics[:-1])


def _train_ray(cfg, info, run_dir, tracker, resume_from, callbacks) -> Outcome:
    from rayrec.train.cluster import ensure_ray, placement_error, preflight, worker_start_timeout
    from rayrec.train.ray_trainer import build_trainer

    ensure_ray()
    preflight(cfg)
    trainer = build_trainer(cfg, info, run_dir=run_dir, tracking_uri=tracker.uri, mlflow_run_id=tracker.run_id,
                            resume_from=resume_from, callbacks=callbacks)
    try:
        with worker_start_timeout(cfg):
            result = trainer.fit()
    except Exception as e:
        friendly = placement_error(e, cfg)
        if friendly is None:
            raise
        raise friendly from None
    if result.error:
        raise RayrecError(f"training failed: {result.error}")
    ckpt = result.checkpoint.path if result.checkpoint else None
    return Outcome(dict(result.metrics or {}), run_dir, ckpt, tracker.run_id)


def _finish(tracker: Tracker, outcome: Outcome) -> None:
    """Driver-side records: final metrics, the learning-curve PNG, the checkpoint path."""
    if not tracker.active:
        return
    tracker.set_tags({"rayrec.checkpoint": outcome.checkpoint or "", "rayrec.best_epoch": outcome.metrics.get("best_epoch", "")})
    keys = ["train/loss", "val/ndcg@10", "val/hr@10", "train/grad_norm"]
    curves = {k: tracker.history(k) for k in keys}
    if any(curves.values()):
        tracker.log_figure(learning_curves(curves), "learning_curves.png")
    tracker.finish("FINISHED")


def summary_rows(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    keys = sorted(k for k in metrics if k.startswith(("test/", "val/", "best/")))
    rows = [(k, f"{metrics[k]:.4f}") for k in keys]
    for k in ("best_epoch", "epoch", "stopped_early"):
        if k in metrics:
            rows.append((k, f"{metrics[k]:g}"))
    return rows
