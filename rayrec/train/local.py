"""Run the framework-free loop in this process (no Ray): baselines, tests, benchmarks."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rayrec.config.schema import JobConfig
from rayrec.console import Progress, report_epoch
from rayrec.data.dataset import Prepared
from rayrec.tracking.mlflow_tracking import Tracker
from rayrec.train.checkpoint import (
    MID_EPOCH_STEP,
    checkpoint_name,
    load_state,
    prune_checkpoints,
    resume_metrics,
    save_state,
    seed_everything,
    write_score,
)
from rayrec.train.evaluation import evaluate
from rayrec.train.inputs import DataInfo, TableBatches, data_info, row_tables
from rayrec.train.loop import LossModule, fit
from rayrec.train.specs import build, has_parameters
from rayrec.train.state import TrainState

log = logging.getLogger(__name__)

#: A training loop run in this process: ``loop(model, batches, cfg, num_items=, device=, reporter=,
#: resume=, steps_per_epoch=, progress=)`` -> final metrics.
Loop = Callable[..., dict[str, float]]


class PlainBatches(TableBatches):
    """``Batches`` of this process: the row tables built here, all rows (rank 0 of 1). The Ray
    workers' in-memory path is the same class over tables from the object store."""

    def __init__(self, cfg: JobConfig, ds: Prepared, info: DataInfo) -> None:
        super().__init__(cfg, info, row_tables(cfg, info))


class LocalReporter:
    """Logs metrics to MLflow (and, ``show``, the console) and writes a checkpoint folder per
    epoch under ``run_dir``, keeping ``keep``: (N, metric, mode) = the best N by the metric plus
    the newest (for a resume), as Ray Train's checkpoint manager does on the Ray path."""

    def __init__(self, run_dir: Path | None, tracker: Tracker, show: bool = False,
                 keep: tuple[int | None, str, str] | None = None) -> None:
        self.run_dir, self.tracker, self.show, self.keep = run_dir, tracker, show, keep
        self.metrics: list[dict[str, float]] = []
        self.last_checkpoint: Path | None = None

    def log_step(self, metrics: dict[str, float], step: int) -> None:
        """Metrics on the optimizer-step axis (gradient health)."""
        self.tracker.log_metrics(metrics, step=step)

    def report(self, metrics: dict[str, float], state: dict[str, Any] | None) -> None:
        if MID_EPOCH_STEP not in metrics:  # mid-epoch reports only carry a checkpoint
            self.metrics.append(dict(metrics))
            epoch = int(metrics.get("epoch", 0))  # the MLflow step
            self.tracker.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
            if self.show:
                report_epoch(metrics)
        if state is not None and self.run_dir is not None:
            self.last_checkpoint = self.run_dir / checkpoint_name(metrics)
            save_state(state, self.last_checkpoint)
            metric = self.keep[1] if self.keep else None
            if metric in metrics:
                write_score(self.last_checkpoint, metric, float(metrics[metric]))
            if self.keep and self.keep[0] is not None:
                prune_checkpoints(self.run_dir, self.last_checkpoint, *self.keep)


def sequential_loop(model: torch.nn.Module, batches: PlainBatches, cfg: JobConfig, **kw) -> dict[str, float]:
    """``fit`` of one model (no DDP wrapper in one process)."""
    return fit(LossModule(model), model, batches, cfg, **kw)


def run_local(cfg: JobConfig, ds: Prepared, info: DataInfo, *, run_dir: Path | None, tracker: Tracker,
              resume_from: str | Path | None = None, loop: Loop = sequential_loop,
              show: bool = False) -> tuple[dict[str, float], LocalReporter]:
    """Fit with ``loop`` (or, for parameter-free baselines, just evaluate) in this process.

    ``loop(model, batches, cfg, **kw)``: ``sequential_loop`` or the joint model's ``fit_joint``.
    ``show``: send progress and epoch lines to the job's console.
    """
    seed_everything(cfg.run.seed)
    device = torch.device("cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu")
    model = build(cfg, info).to(device)
    batches = PlainBatches(cfg, ds, info)
    log.info("data: in memory, %s", batches.describe())
    es = cfg.train.early_stopping
    reporter = LocalReporter(run_dir, tracker, show=show, keep=(cfg.run.checkpoint.num_to_keep, es.metric, es.mode))
    if not has_parameters(model):
        model.fit(ds.table("train")["seq"])
        final = evaluate(model, batches.valid(), cfg, info.num_items, device, prefix="val/")
        final.update(evaluate(model, batches.test(), cfg, info.num_items, device, prefix="test/"))
        # its counts are its weights: a checkpoint, so `rayrec recommend`, `eval` and `export` read it as any model's
        reporter.report({"epoch": 0, **final}, TrainState().checkpoint(model, cfg))
        return final, reporter
    resume = load_state(resume_from) if resume_from else None
    if resume is not None:
        tracker.log_metrics(resume_metrics(resume), step=int(resume["epoch"]))
    micro = len(batches.train(1))
    progress = Progress(cfg.train.epochs * micro, cfg.train.epochs, initial=int(resume["epoch"]) * micro
                        if resume else 0) if show else None
    final = loop(model, batches, cfg, num_items=info.num_items, device=device, reporter=reporter, resume=resume,
                 steps_per_epoch=math.ceil(micro / cfg.train.grad_accum), progress=progress)
    return final, reporter


def evaluate_checkpoint(cfg: JobConfig, checkpoint: str | Path, split: str, weights: str = "best"
                        ) -> tuple[dict[str, float], int]:
    """``rayrec eval``: the metrics of a checkpoint's best (or last) weights on the valid or test split,
    and the epoch it was written at. Refused on other data than it was trained on."""
    from rayrec.data.dataset import check_same_data, ensure_prepared
    from rayrec.train.state import load_model_weights

    ds = ensure_prepared(cfg.data)
    info = data_info(ds, cfg)
    state = load_state(checkpoint)
    check_same_data(state.get("data"), cfg.data.path, f"checkpoint {checkpoint}")
    model = build(cfg, info)
    chosen = state["best_model"] if weights == "best" and state.get("best_model") else state["model"]
    load_model_weights(model, chosen, f"checkpoint {checkpoint}")
    batches = PlainBatches(cfg, ds, info)
    loader = batches.test() if split == "test" else batches.valid()
    return evaluate(model, loader, cfg, info.num_items, torch.device("cpu"), prefix=f"{split}/"), int(state["epoch"])
