"""Ray Train wiring of LoRA SFT: the per-worker function and the ``TorchTrainer``.

Prompt tables travel as Ray Datasets that are *not* split across workers: the HF
Trainer (through accelerate) already gives each rank its own part of a map-style
dataset with a distributed sampler, so splitting them in Ray Data too would train each
worker on 1/W^2 of the data. Each worker materialises the table into a HF ``Dataset``;
``prepare_trainer`` is applied as Ray documents (it only changes the data loaders of
Ray Data iterables), and ``RayTrainReportCallback`` reports each epoch's checkpoint
(adapter, extended tokenizer, trainer state, ``genrec.json``) with its metrics.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from rayrec.genrec.config import GenRecJobConfig
from rayrec.tracking.mlflow_tracking import Tracker

log = logging.getLogger(__name__)

TRAIN_KEY, VALID_KEY = "sft_train", "sft_valid"


def _rows(key: str) -> list[dict[str, Any]] | None:
    """This worker's full copy of a prompt table (None when the job has no such table)."""
    import ray.train

    try:
        shard = ray.train.get_dataset_shard(key)
    except (KeyError, ValueError):
        return None
    return None if shard is None else list(shard.iter_rows())


def sft_worker(config: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker: build the PEFT model and run TRL's trainer."""
    import datasets
    import ray.train
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer

    from rayrec.genrec.sft import build_trainer, pick_dtype, prepare_base
    from rayrec.train.ray_trainer import quiet_ray_worker_logs

    quiet_ray_worker_logs()
    datasets.disable_progress_bars()
    cfg = GenRecJobConfig.model_validate(config["job"])
    rank = ray.train.get_context().get_world_rank()
    use_gpu = cfg.scaling.use_gpu
    model, tokenizer, new_ids = prepare_base(config["base"], config["sid_vocab"], pick_dtype(cfg.model.dtype, use_gpu))
    tracker = Tracker(config.get("tracking_uri"), config.get("mlflow_run_id")) if rank == 0 else Tracker.null()
    train_rows, valid_rows = _rows(TRAIN_KEY), _rows(VALID_KEY)
    callbacks = sft_callbacks(cfg, config, model, tokenizer, tracker, valid_rows) + [RayTrainReportCallback()]
    output_dir = Path(tempfile.gettempdir()) / "rayrec_sft" / config["run_name"] / f"rank_{rank}"
    trainer = build_trainer(cfg, model, tokenizer, new_ids, train_rows, valid_rows, output_dir,
                            use_gpu=use_gpu, deepspeed=config.get("deepspeed"), callbacks=callbacks)
    trainer = prepare_trainer(trainer)
    checkpoint = ray.train.get_checkpoint() or _explicit(config.get("resume_from"))
    if checkpoint is None:
        trainer.train()
        return
    with checkpoint.as_directory() as d:
        inner = Path(d) / RayTrainReportCallback.CHECKPOINT_NAME  # Ray's layout; a bare HF folder works too
        trainer.train(resume_from_checkpoint=str(inner if inner.is_dir() else d))


def sft_callbacks(cfg: GenRecJobConfig, loop: dict[str, Any], model, tokenizer, tracker, valid_rows) -> list:
    """Metric names + MLflow, checkpoint metadata, and (``train.val_rows`` > 0) validation ranking."""
    from rayrec.genrec.evaluate import val_ranking_callback
    from rayrec.genrec.sft import make_callbacks

    meta = {**loop["meta"], "embedding_rows": int(model.get_input_embeddings().weight.shape[0])}
    callbacks = make_callbacks(tracker, meta, loop["sid_index"])
    if cfg.train.val_rows and valid_rows:
        records = valid_rows[: cfg.train.val_rows]
        callbacks.append(val_ranking_callback(records, loop["item_sids"], tokenizer, cfg, tracker))
    return callbacks


def _explicit(path: str | None):
    """A Ray ``Checkpoint`` for ``--resume-from`` (a folder holding ``checkpoint/``), else None."""
    import ray.train

    return ray.train.Checkpoint.from_directory(path) if path else None


def build_sft_trainer(cfg: GenRecJobConfig, *, run_dir: Path, train_rows, valid_rows, loop: dict[str, Any],
                      callbacks: list | None = None):
    """A ``TorchTrainer`` for the job's ``scaling`` and ``run`` sections (gloo on CPU, nccl on GPU)."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    metric, mode = cfg.selection_metric
    datasets = {TRAIN_KEY: ray.data.from_pandas(train_rows[["prompt", "completion"]])}
    if valid_rows is not None:
        datasets[VALID_KEY] = ray.data.from_pandas(valid_rows[["prompt", "completion", "target"]])
    run = ray.train.RunConfig(
        name=run_dir.name, storage_path=str(run_dir.parent), callbacks=callbacks or [],
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=cfg.run.checkpoint.num_to_keep, checkpoint_score_order=mode,
            checkpoint_score_attribute=metric if valid_rows is not None else None),
        failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
        logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        worker_runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE":
                                         os.environ.get("HF_HUB_OFFLINE", "0"), "TOKENIZERS_PARALLELISM": "false"}},
    )
    return TorchTrainer(
        sft_worker, train_loop_config={"job": cfg.model_dump(mode="json"), "run_name": run_dir.name, **loop},
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                               resources_per_worker=dict(cfg.scaling.resources_per_worker)),
        run_config=run, datasets=datasets, dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )
