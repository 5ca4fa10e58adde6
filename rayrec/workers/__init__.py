"""What runs inside Ray Train workers, named for what it wraps (as Ray's ``ray.train.torch`` and
``ray.train.huggingface``): ``rayrec.workers.torch`` for the torch loops (DDP, the joint model's
gradient averaging, batches, the per-epoch reporter), ``rayrec.workers.hf`` for the Hugging Face
trainers (SFT, GRPO). This module holds what both use: quiet worker logs, rank and world, the
MLflow handle of rank 0, the progress stream and the checkpoint to resume from.

No recipe owns these pieces; each recipe's worker function composes them.
"""

from __future__ import annotations

import logging
from typing import Any

from rayrec import console
from rayrec.tracking.mlflow_tracking import Tracker


def quiet_worker_logs() -> None:
    """Ray Train/Data INFO lines in a worker repeat what rayrec's epoch line says; keep their warnings.

    Ray Train v2 logs every ``report`` call (all metrics, ~2 kB per line per worker) at INFO under
    a logger named by its file path, not under "ray.train", so that one is named explicitly.
    """
    for name in ("ray.train", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: its INFO lines stay
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def rank_and_world() -> tuple[int, int]:
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def worker_tracker(config: dict[str, Any], rank: int) -> Tracker:
    """Rank 0 logs into the run's MLflow run (opened by the driver); other ranks log nothing."""
    if rank != 0:
        return Tracker.null()
    outage = (config.get("job") or {}).get("tracking", {}).get("max_outage_s")
    return Tracker(config.get("tracking_uri"), config.get("mlflow_run_id"), outage)


def progress_for(config: dict[str, Any], rank: int, *, epochs: int, steps: int,
                 initial_epochs: int = 0) -> console.Progress | None:
    """The run's progress stream (rank 0, when the driver shows a console); ``steps`` micro-batches an epoch."""
    if rank != 0 or not config.get("console", True):
        return None
    return console.Progress(epochs * steps, epochs, initial=initial_epochs * steps)


def resume_checkpoint(explicit: str | None):
    """The newest Ray checkpoint of this run (after a worker or driver restart), else ``explicit``."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        return ckpt
    if not explicit:
        return None
    # an object-store URI: the file system comes from this worker's environment
    return ray.train.Checkpoint(explicit) if "://" in explicit else ray.train.Checkpoint.from_directory(explicit)
