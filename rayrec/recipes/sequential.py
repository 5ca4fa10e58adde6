"""The ``sequential`` recipe: SASRec (DDP over Ray Train workers) and the popularity baseline.

prepare: the prepared dataset (built from its source when missing) and its summary.
worker:  seed -> model -> DDP -> ``fit`` with the worker's shards, the metric all-reduce and
         a reporter that sends metrics and a checkpoint to Ray every epoch.
local:   the same ``fit`` in this process (a parameter-free baseline always runs here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rayrec.config.schema import JobConfig
from rayrec.console import report_end, send_to_driver
from rayrec.data.dataset import Prepared, ensure_prepared
from rayrec.data.streaming import ray_dataset
from rayrec.models import PARAMETER_FREE
from rayrec.runs import Outcome, Recipe, Run, TrainerParts
from rayrec.tracking.mlflow_tracking import Tracker
from rayrec.train.checkpoint import newest_readable, resume_metrics, seed_everything
from rayrec.train.worker import DataInfo, build, data_info, micro_batches_per_epoch, steps_per_epoch
from rayrec.workers import (
    RayReporter,
    ShardBatches,
    all_reduce_sum,
    progress_for,
    quiet_worker_logs,
    rank_and_world,
    resume_state,
    worker_tracker,
)


@dataclass
class Inputs:
    ds: Prepared
    info: DataInfo


def prepare(cfg: JobConfig, run: Run) -> Inputs:
    ds = ensure_prepared(cfg.data)
    return Inputs(ds, data_info(ds))


def share(cfg: JobConfig) -> None:
    """A sweep's trials all read the prepared dataset: prepare it once, before any trial."""
    ensure_prepared(cfg.data)


def record(tracker: Tracker, inputs: Inputs) -> None:
    tracker.log_file(inputs.ds.path / "manifest.json", "data")


# ----------------------------------------------------------------------------- in this process


def local(cfg: JobConfig, inputs: Inputs, run: Run, loop=None) -> Outcome:
    """The loop in this process; a re-run after a crash continues from the run's newest checkpoint."""
    from rayrec.train.local import run_local, sequential_loop

    resume_from = run.resume_from or newest_readable(run.dir)  # a torn newest one is skipped, with a warning
    final, rep = run_local(cfg, inputs.ds, inputs.info, run_dir=run.dir, tracker=run.tracker, resume_from=resume_from,
                           loop=loop or sequential_loop, show=run.console)
    return Outcome(final, run.dir, str(rep.last_checkpoint) if rep.last_checkpoint else None,
                   run.tracker.run_id, rep.metrics[:-1])


# ----------------------------------------------------------------------------- on Ray Train


@dataclass
class WorkerSetup:
    """What every worker of a ``JobConfig`` recipe starts with."""

    cfg: JobConfig
    info: DataInfo
    rank: int
    world: int
    device: Any
    model: Any
    tracker: Tracker
    resume: dict[str, Any] | None


def setup_worker(config: dict[str, Any]) -> WorkerSetup:
    """Quiet logs, the job, rank, seeds (same init on every rank), device, model, MLflow, resume state."""
    import ray.train.torch

    quiet_worker_logs()
    send_to_driver(bool(config.get("console")))
    cfg = JobConfig.model_validate(config["job"])
    info = DataInfo(**config["data"])
    rank, world = rank_and_world()
    seed_everything(cfg.run.seed)
    model = build(cfg, info)
    tracker = worker_tracker(config, rank)
    resume = resume_state(config.get("resume_from"))
    if resume is not None:
        tracker.log_metrics(resume_metrics(resume), step=int(resume["epoch"]))
    return WorkerSetup(cfg, info, rank, world, ray.train.torch.get_device(), model, tracker, resume)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker: DDP over the model's loss, then ``fit``."""
    import ray.train.torch

    from rayrec.train.loop import LossModule, fit

    w = setup_worker(config)
    # phases that freeze parameters change what trains after DDP is built: it must look for unused ones
    freezes = any(p.freeze or p.trainable is not None for p in w.cfg.train.phases)
    module = ray.train.torch.prepare_model(LossModule(w.model),
                                           parallel_strategy_kwargs={"find_unused_parameters": freezes})
    w.model.to(w.device)
    epochs = w.cfg.train.epochs
    progress = progress_for(config, w.rank, epochs=epochs, steps=micro_batches_per_epoch(w.cfg, w.info),
                            initial_epochs=int(w.resume["epoch"]) if w.resume else 0)
    fit(module, w.model, ShardBatches(w.cfg, w.info, w.rank, w.world), w.cfg, num_items=w.info.num_items,
        device=w.device, reporter=RayReporter(w.rank, w.tracker, score=w.cfg.train.early_stopping.metric), resume=w.resume, reduce=all_reduce_sum,
        world_size=w.world, progress=progress, steps_per_epoch=steps_per_epoch(w.cfg, w.info))
    if progress is not None:
        report_end()


def ray_datasets(cfg: JobConfig, info: DataInfo) -> dict[str, Any]:
    """Lazy Ray Data pipelines for the three splits (read parquet -> pad/truncate)."""
    max_len = cfg.model.max_len
    return {
        "train": ray_dataset(info.path, "train", max_len=max_len),
        "valid": ray_dataset(info.path, "valid", max_len=max_len, seen_len=info.seen_len),
        "test": ray_dataset(info.path, "test", max_len=max_len, seen_len=info.seen_len),
    }


def trainer_parts(cfg: JobConfig, inputs: Inputs, run: Run, loop=train_loop_per_worker) -> TrainerParts:
    """The worker loop over the three splits; train split across workers, rows kept in file order."""
    import ray.train

    opts = ray.train.DataConfig.default_ingest_options()
    opts.preserve_order = True  # seeded batches
    return TrainerParts(loop=loop, config={"data": inputs.info.__dict__}, datasets=ray_datasets(cfg, inputs.info),
                        dataset_config=ray.train.DataConfig(datasets_to_split=["train"], execution_options=opts))


def outcome(cfg: JobConfig, result, run: Run) -> Outcome:
    ckpt = result.checkpoint.path if result.checkpoint else None
    return Outcome(dict(result.metrics or {}), run.dir, ckpt, run.tracker.run_id)


def console_keys(cfg: JobConfig) -> list[str]:
    """train/loss and the validation metrics at the early-stopping metric's K."""
    metric = cfg.train.early_stopping.metric
    k = metric.partition("@")[2]
    keys = [f"val/{m}@{k}" for m in ("ndcg", "hr")] if k else []
    return ["train/loss", *dict.fromkeys([metric, *keys])]


RECIPE = Recipe(
    name="sequential", prepare=prepare, record=record, local=local,
    trainer=trainer_parts, outcome=outcome, console_keys=console_keys, share=share,
    tags=lambda cfg: {"rayrec.model": cfg.model.name},
    in_process=lambda cfg: cfg.model.name in PARAMETER_FREE,
)
