"""The ``sequential`` recipe: SASRec (DDP over Ray Train workers) and the popularity baseline.

prepare: the prepared dataset (built from its source when missing) and its summary.
worker:  seed -> model -> DDP -> ``fit`` with the worker's shards, the metric all-reduce and
         a reporter that sends metrics and a checkpoint to Ray every epoch.
local:   the same ``fit`` in this process (a parameter-free baseline always runs here).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from rayrec.config.schema import JobConfig
from rayrec.console import report_end, send_to_driver
from rayrec.data.dataset import Prepared, ensure_prepared
from rayrec.data.streaming import ray_dataset
from rayrec.runs import Outcome, Recipe, Run, TrainerParts
from rayrec.storage import checkpoint_uri
from rayrec.tracking.mlflow_tracking import Tracker
from rayrec.train.checkpoint import newest_readable, resume_metrics, seed_everything
from rayrec.train.inputs import (
    DataInfo,
    TableBatches,
    data_info,
    micro_batches_per_epoch,
    row_tables,
    steps_per_epoch,
    window_stride,
)
from rayrec.train.specs import build, spec_of
from rayrec.workers import progress_for, quiet_worker_logs, rank_and_world, worker_tracker
from rayrec.workers.torch import RayReporter, all_reduce_sum, resume_state, worker_batches

log = logging.getLogger(__name__)


@dataclass
class Inputs:
    ds: Prepared
    info: DataInfo
    tables: dict[str, Any] | None = None  # object refs of the in-memory row tables (the Ray path)


@dataclass(frozen=True)
class Shared:
    """What a sweep's driver made once for all trials: the data's sizes and its row tables in
    the object store, for the jobs whose rows are the same (``key``)."""

    key: tuple
    info: DataInfo
    tables: dict[str, Any] | None


def rows_key(cfg: JobConfig, ds: Prepared) -> tuple:
    """Jobs with equal keys train and evaluate on the same rows."""
    return (str(ds.path.resolve()), ds.manifest.get("created_at"), cfg.model.max_len, cfg.train.windows,
            window_stride(cfg))


def prepare(cfg: JobConfig, run: Run) -> Inputs:
    ds = ensure_prepared(cfg.data)
    shared = run.shared if isinstance(run.shared, Shared) and run.shared.key == rows_key(cfg, ds) else None
    if shared is not None:
        return Inputs(ds, shared.info, shared.tables)
    return Inputs(ds, data_info(ds, cfg))


def share(cfg: JobConfig) -> Shared:
    """A sweep's trials all read the prepared dataset: prepare it once, before any trial, and
    (when they fit) put its row tables in the object store for every trial whose rows are these."""
    ds = ensure_prepared(cfg.data)
    info = data_info(ds, cfg)
    return Shared(rows_key(cfg, ds), info, put_tables(cfg, info) if choose_ingest(cfg, info) == "memory" else None)


# ----------------------------------------------------------------------------- the data path


def table_bytes(cfg: JobConfig, info: DataInfo) -> int:
    """About what the in-memory row tables of the three splits take (int64: windows of inputs and
    targets, evaluation histories, and the evaluation rows' whole histories to mask seen items)."""
    width = cfg.model.max_len
    return 8 * (info.train_rows * (2 * width + 2) + info.eval_rows * (width + 3) + 2 * info.events)


def choose_ingest(cfg: JobConfig, info: DataInfo) -> str:
    """``data.ingest``, with ``auto`` resolved by the tables' size against the object store."""
    if cfg.data.ingest != "auto":
        return cfg.data.ingest
    import ray

    store = ray.cluster_resources().get("object_store_memory", 0)
    return "memory" if table_bytes(cfg, info) <= cfg.data.memory_fraction * store else "stream"


def put_tables(cfg: JobConfig, info: DataInfo) -> dict[str, Any]:
    """The row tables, built here once, in the object store (workers read them without a copy)."""
    import ray

    tables = row_tables(cfg, info)
    refs = {k: ray.put(v) for k, v in tables.items()}
    log.info("data: %s put in the object store", TableBatches(cfg, info, tables).describe())
    return refs


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
    batches: Any  # this worker's ``Batches`` (in-memory tables or Ray Data shards)


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
    resume = resume_state(config.get("resume_from"), config.get("newest_on_disk"))
    if resume is not None:
        tracker.log_metrics(resume_metrics(resume), step=int(resume["epoch"]))
    return WorkerSetup(cfg, info, rank, world, ray.train.torch.get_device(), model, tracker, resume,
                       worker_batches(config, cfg, info, rank, world))


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
    fit(module, w.model, w.batches, w.cfg, num_items=w.info.num_items,
        device=w.device, reporter=RayReporter(w.rank, w.tracker, score=w.cfg.train.early_stopping.metric), resume=w.resume, reduce=all_reduce_sum,
        world_size=w.world, progress=progress, steps_per_epoch=steps_per_epoch(w.cfg, w.info))
    if progress is not None:
        report_end()


def ray_datasets(cfg: JobConfig, info: DataInfo) -> dict[str, Any]:
    """Lazy Ray Data pipelines for the three splits (read parquet -> windows / pad)."""
    max_len = cfg.model.max_len
    return {
        "train": ray_dataset(info.path, "train", max_len=max_len, windows=cfg.train.windows, stride=window_stride(cfg)),
        "valid": ray_dataset(info.path, "valid", max_len=max_len, seen_len=info.seen_len),
        "test": ray_dataset(info.path, "test", max_len=max_len, seen_len=info.seen_len),
    }


def trainer_parts(cfg: JobConfig, inputs: Inputs, run: Run, loop=train_loop_per_worker) -> TrainerParts:
    """The worker loop over the three splits: in-memory row tables (read and transformed once,
    here) or Ray Data streams (every epoch), by ``data.ingest``; the log says which."""
    from rayrec.data.ray_ingest import SplitEvalConfig

    info = inputs.info
    ingest = "memory" if inputs.tables else choose_ingest(cfg, info)
    if ingest == "memory":
        if inputs.tables:
            log.info("data: in memory, the sweep's row tables (made once on its driver)")
        else:
            inputs.tables = put_tables(cfg, info)  # held by inputs (the driver) while the trainer runs
        return TrainerParts(loop=loop, config={"data": info.__dict__, "tables": inputs.tables}, datasets={})
    log.info("data: streaming from Ray Data every epoch (data.ingest=%s; the row tables would take about %.1f GiB)",
             cfg.data.ingest, table_bytes(cfg, info) / 2**30)
    opts = SplitEvalConfig.default_ingest_options()
    opts.preserve_order = True  # seeded batches
    return TrainerParts(loop=loop, config={"data": info.__dict__}, datasets=ray_datasets(cfg, info),
                        dataset_config=SplitEvalConfig(datasets_to_split=["train"], execution_options=opts))


def outcome(cfg: JobConfig, result, run: Run) -> Outcome:
    ckpt = checkpoint_uri(result.checkpoint) if result.checkpoint else None
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
    in_process=lambda cfg: spec_of(cfg.model.name).parameter_free,
    object_storage=True,  # every checkpoint is a Ray Train report (``workers.torch.RayReporter``)
)
