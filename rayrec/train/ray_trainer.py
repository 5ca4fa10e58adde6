"""Ray Train wiring: the per-worker function and the ``TorchTrainer`` built from a job.

The worker sets devices, seeds and the process group (via Ray), builds the model,
and hands the framework-free ``fit`` three Ray-backed pieces: batches from its
dataset shards, an all-reduce for metric sums, and a reporter that calls
``ray.train.report(metrics, checkpoint)`` every epoch.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from rayrec.config.schema import JobConfig
from rayrec.data.streaming import iter_shard, ray_dataset
from rayrec.tracking.mlflow_tracking import Tracker
from rayrec.train.checkpoint import (
    MID_EPOCH_STEP,
    checkpoint_name,
    load_state,
    resume_metrics,
    save_state,
    seed_everything,
)
from rayrec.train.loop import LossModule, fit
from rayrec.train.worker import DataInfo, build, collate_for, steps_per_epoch

log = logging.getLogger(__name__)


class ShardBatches:
    """``Batches`` for this worker: its split of train, every world-th row of valid/test.

    Train is split equally by Ray (DDP needs the same number of steps on every rank).
    Evaluation must see every row exactly once, and an equal split may drop up to
    world-1 rows, so each worker reads all of valid/test and keeps rows i with
    i % world == rank; metric sums are then all-reduced.
    """

    def __init__(self, cfg: JobConfig, info: DataInfo, rank: int = 0, world: int = 1) -> None:
        import ray.train

        self.cfg, self.info, self.rank, self.world = cfg, info, rank, world
        self.shards = {s: ray.train.get_dataset_shard(s) for s in ("train", "valid", "test")}

    def train(self, epoch: int):
        return iter_shard(self.shards["train"], batch_size=self.cfg.train.batch_size,
                          collate=collate_for(self.cfg, self.info, epoch), shuffle_buffer=self.cfg.train.shuffle_buffer)

    def valid(self):
        return self._strided("valid")

    def test(self):
        return self._strided("test")

    def _strided(self, split: str):
        batches = iter_shard(self.shards[split], batch_size=self.cfg.train.eval.batch_size, collate=collate_for(self.cfg, self.info))
        offset = 0
        for batch in batches:
            n = next(iter(batch.values())).shape[0]
            keep = (torch.arange(offset, offset + n) % self.world) == self.rank
            offset += n
            if keep.any():
                yield {k: v[keep] for k, v in batch.items()}


class RayReporter:
    """Every worker reports (Train V2 requires it); rank 0 adds the checkpoint and logs to MLflow."""

    def __init__(self, rank: int, tracker: Tracker) -> None:
        self.rank, self.tracker = rank, tracker

    def report(self, metrics: dict[str, float], state: dict[str, Any] | None) -> None:
        import ray.train

        epoch = int(metrics.get("epoch", 0))
        if MID_EPOCH_STEP not in metrics:  # mid-epoch reports only carry a checkpoint
            self.tracker.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
        if state is None or self.rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as d:
            save_state(state, d)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                             checkpoint_dir_name=checkpoint_name(metrics))


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over workers (a no-op when there is one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def quiet_ray_worker_logs() -> None:
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


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker."""
    import ray.train
    import ray.train.torch
    from ray.experimental.tqdm_ray import tqdm

    quiet_ray_worker_logs()
    cfg = JobConfig.model_validate(config["job"])
    info = DataInfo(**config["data"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed_everything(cfg.run.seed)  # same init on every rank; DDP broadcasts rank 0's anyway
    device = ray.train.torch.get_device()
    model = build(cfg, info)
    if cfg.model.name == "ur4rec":  # staged joint training without a DDP wrapper (see rayrec.train.joint_ray)
        from rayrec.train.joint_ray import run_joint_worker

        return run_joint_worker(cfg, info, model, config, rank=rank, world=world, device=device)
    module = ray.train.torch.prepare_model(LossModule(model))
    model.to(device)
    resume = _resume_state(config.get("resume_from"))
    tracker = Tracker(config.get("tracking_uri"), config.get("mlflow_run_id")) if rank == 0 else Tracker.null()
    if resume is not None:
        tracker.log_metrics(resume_metrics(resume), step=int(resume["epoch"]))
    steps = steps_per_epoch(cfg, info)
    bar = EpochBar(tqdm, cfg.train.epochs, steps) if rank == 0 and config.get("progress", True) else None
    try:
        fit(module, model, ShardBatches(cfg, info, rank, world), cfg, num_items=info.num_items, device=device,
            reporter=RayReporter(rank, tracker), resume=resume, reduce=all_reduce_sum, world_size=world,
            progress=bar, steps_per_epoch=steps)
    finally:
        if bar is not None:
            bar.close()


class EpochBar:
    """One bar on the driver's console (tqdm_ray), reset in place at each epoch.

    A new tqdm_ray bar per epoch would leave every closed bar on screen.
    """

    def __init__(self, factory, epochs: int, steps: int) -> None:
        self.bar = factory(desc="epoch 1", total=epochs * steps)
        self.epochs = epochs

    def __call__(self, it, epoch: int):
        self.bar.set_description(f"epoch {epoch}/{self.epochs}")
        for x in it:
            yield x
            self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _resume_state(explicit: str | None) -> dict[str, Any] | None:
    """The newest checkpoint of this run (after a worker or driver restart), else ``explicit``."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            return load_state(d)
    return load_state(explicit) if explicit else None


def ray_datasets(cfg: JobConfig, info: DataInfo) -> dict[str, Any]:
    """Lazy Ray Data pipelines for the three splits (read parquet -> pad/truncate)."""
    max_len = cfg.model.max_len
    return {
        "train": ray_dataset(info.path, "train", max_len=max_len),
        "valid": ray_dataset(info.path, "valid", max_len=max_len, seen_len=info.seen_len),
        "test": ray_dataset(info.path, "test", max_len=max_len, seen_len=info.seen_len),
    }


def ingest_options():
    """Ray Train's default ingest options, with rows kept in file order (seeded batches)."""
    import ray.train

    opts = ray.train.DataConfig.default_ingest_options()
    opts.preserve_order = True
    return opts


def build_trainer(cfg: JobConfig, info: DataInfo, *, run_dir: Path, tracking_uri: str | None = None,
                  mlflow_run_id: str | None = None, resume_from: str | None = None, callbacks: list | None = None,
                  progress: bool = True):
    """A ``TorchTrainer`` from the job's ``scaling`` and ``run`` sections."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    scaling = ray.train.ScalingConfig(
        num_workers=cfg.scaling.num_workers,
        use_gpu=cfg.scaling.use_gpu,
        resources_per_worker=dict(cfg.scaling.resources_per_worker),
    )
    run = ray.train.RunConfig(
        name=run_dir.name,
        storage_path=str(run_dir.parent),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.checkpoint.num_to_keep),
        # max_failures: worker deaths survived (resume from the newest checkpoint); the controller
        # limit bounds the worker-group start attempts, which Ray would otherwise retry forever
        failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures,
                                               controller_failure_limit=cfg.scaling.start_attempts - 1),
        callbacks=callbacks or [],
        logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        worker_runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}},
    )
    loop_config = {
        "job": cfg.model_dump(mode="json"),
        "data": info.__dict__,
        "tracking_uri": tracking_uri,
        "mlflow_run_id": mlflow_run_id,
        "resume_from": resume_from,
        "progress": progress,  # off in sweeps: many trials' bars would interleave
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        scaling_config=scaling,
        run_config=run,
        datasets=ray_datasets(cfg, info),
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"], execution_options=ingest_options()),
    )
