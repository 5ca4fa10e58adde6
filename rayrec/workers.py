"""Worker-side platform pieces that several recipes use inside Ray Train workers.

The batches of a worker's dataset shards, the reporter that calls ``ray.train.report``
each epoch, the metric all-reduce, the resume state, the MLflow handle of rank 0, quiet
worker logs and the progress bar's event stream. No recipe owns them; each recipe's worker
function composes them (``rayrec.recipes.sequential``, ``joint``, ``sft``).
"""

from __future__ import annotations

import logging
import tempfile
from typing import Any

import torch

from rayrec import console
from rayrec.config.schema import JobConfig
from rayrec.data.streaming import iter_shard
from rayrec.tracking.mlflow_tracking import Tracker
from rayrec.train.checkpoint import MID_EPOCH_STEP, checkpoint_name, load_state, save_state
from rayrec.train.worker import DataInfo, TableBatches, collate_for


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
    return Tracker(config.get("tracking_uri"), config.get("mlflow_run_id")) if rank == 0 else Tracker.null()


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
    return ray.train.Checkpoint.from_directory(explicit) if explicit else None


def resume_state(explicit: str | None) -> dict[str, Any] | None:
    """The loaded state of ``resume_checkpoint`` (the sequential and joint loops' format)."""
    ckpt = resume_checkpoint(explicit)
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return load_state(d)


def comm_device() -> torch.device:
    """Where the process group's collectives take tensors: the GPU for NCCL, else the CPU."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over workers (a no-op when there is one); returned on ``t``'s device.

    NCCL takes only GPU tensors: a CPU tensor (the metric sums) goes to the GPU and back.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out = t.to(comm_device(), copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        t = out.to(t.device)
    return t


class StreamBatches:
    """``Batches`` for this worker from its Ray Data shards (the streaming path).

    Train is split equally by Ray (DDP needs the same number of steps on every rank); valid and
    test are split with ``equal=False`` (``SplitEvalConfig``), so the workers together read every
    evaluation row once and their metric sums are all-reduced.
    """

    def __init__(self, cfg: JobConfig, info: DataInfo) -> None:
        import ray.train

        self.cfg, self.info = cfg, info
        self.shards = {s: ray.train.get_dataset_shard(s) for s in ("train", "valid", "test")}

    def train(self, epoch: int):
        return iter_shard(self.shards["train"], batch_size=self.cfg.train.batch_size,
                          collate=collate_for(self.cfg, self.info, epoch), shuffle_buffer=self.cfg.train.shuffle_buffer)

    def valid(self):
        return iter_shard(self.shards["valid"], batch_size=self.cfg.train.eval.batch_size, collate=collate_for(self.cfg, self.info))

    def test(self):
        return iter_shard(self.shards["test"], batch_size=self.cfg.train.eval.batch_size, collate=collate_for(self.cfg, self.info))


def worker_batches(config: dict[str, Any], cfg: JobConfig, info: DataInfo, rank: int, world: int):
    """This worker's ``Batches``: the run's row tables from the object store when the driver put
    them there (``config["tables"]``), else its Ray Data shards."""
    refs = config.get("tables")
    if not refs:
        return StreamBatches(cfg, info)
    import ray

    tables = dict(zip(refs, ray.get(list(refs.values()))))  # numpy arrays read in place, not copied
    return TableBatches(cfg, info, tables, rank, world)


class RayReporter:
    """Every worker reports (Train V2 requires it); rank 0 adds the checkpoint, logs to MLflow and
    sends the epoch's line to the console."""

    def __init__(self, rank: int, tracker: Tracker, show: bool = True, score: str | None = None) -> None:
        self.rank, self.tracker, self.show, self.score = rank, tracker, show and rank == 0, score

    def log_step(self, metrics: dict[str, float], step: int) -> None:
        """Metrics on the optimizer-step axis (gradient health); rank 0's tracker logs, others' are null."""
        self.tracker.log_metrics(metrics, step=step)

    def report(self, metrics: dict[str, float], state: dict[str, Any] | None) -> None:
        import ray.train

        epoch = int(metrics.get("epoch", 0))
        if MID_EPOCH_STEP not in metrics:  # mid-epoch reports only carry a checkpoint
            self.tracker.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
            if self.show:
                console.report_epoch(metrics)
        if MID_EPOCH_STEP in metrics and self.score and self.score not in metrics:
            # unscored: NaN ranks last in Ray's checkpoint manager in either mode (a missing key would count
            # as -inf, the best under mode min), so a mid-epoch checkpoint is kept only while it is the newest
            metrics = {**metrics, self.score: float("nan")}
        if state is None or self.rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as d:
            save_state(state, d)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                             checkpoint_dir_name=checkpoint_name(metrics))
