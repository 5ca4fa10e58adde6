"""The torch loops' pieces inside Ray Train workers: the collectives (metric sums, the joint model's
gradient averaging, rank 0's weights), the worker's batches and the reporter that calls
``ray.train.report`` every epoch."""

from __future__ import annotations

import logging
import tempfile
from typing import Any

import torch

from rayrec import console
from rayrec.config.schema import JobConfig
from rayrec.data.streaming import iter_shard
from rayrec.tracking.mlflow_tracking import NOT_LOGGED, Tracker
from rayrec.train.checkpoint import MID_EPOCH_STEP, checkpoint_name, checkpoint_rank, load_state, save_state
from rayrec.train.inputs import DataInfo, TableBatches, collate_for
from rayrec.workers import resume_checkpoint

log = logging.getLogger(__name__)


def resume_state(explicit: str | None, newest_on_disk: str | None = None) -> dict[str, Any] | None:
    """The loaded state of ``resume_checkpoint`` (the sequential and joint loops' format), or of
    ``newest_on_disk`` (the driver's ``newest_readable``) when that one is newer: a run stopped
    right after a report has the checkpoint in its folder before Ray's controller registered it."""
    import ray.train

    ckpt = resume_checkpoint(explicit)
    if newest_on_disk and (ckpt is None or ray_registered_older(ckpt, newest_on_disk)):
        log.info("resuming from %s, newer than the checkpoint Ray registered", newest_on_disk)
        if "://" not in newest_on_disk:
            return load_state(newest_on_disk)
        ckpt = ray.train.Checkpoint(newest_on_disk)  # object storage: resolved from this worker's environment
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return load_state(d)


def ray_registered_older(ckpt, on_disk: str) -> bool:
    import os

    registered = os.path.basename(str(ckpt.path).rstrip("/"))
    return checkpoint_rank(registered) < checkpoint_rank(os.path.basename(on_disk.rstrip("/")))


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


def all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Average the gradients of ``params`` over workers: one small all-reduce of which parameters
    have a gradient anywhere, then one flat all-reduce of those gradients.

    A parameter without a gradient on every worker keeps none (``None``), exactly as with one
    worker, so its optimizer skips it and leaves its state alone. One with a gradient on only
    some workers (unused by the others' batches) counts as zeros there.
    """
    import torch.distributed as dist

    if not params:
        return
    world = dist.get_world_size()
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=comm_device())
    dist.all_reduce(has, op=dist.ReduceOp.SUM)
    chosen = [p for p, n in zip(params, has.tolist(), strict=True) if n > 0]
    if not chosen:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in chosen])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world
    offset = 0
    for p in chosen:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def broadcast_from_rank0(model: torch.nn.Module) -> None:
    """Start every worker from rank 0's weights (what DDP does at construction)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in model.state_dict().values():
            dist.broadcast(t, src=0)


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
        if checkpoint_name(metrics) == "final":  # the driver sums what rank 0 could not log into the run's summary
            not_logged = self.tracker.close(timeout=30)
            if not_logged:
                metrics = {**metrics, NOT_LOGGED: float(not_logged)}
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
