"""The Hugging Face trainers' pieces (TRL's SFT and GRPO trainers) in this process and inside Ray
Train workers: the console callback, a one-process group for DeepSpeed outside Ray, the
best saved checkpoint, a worker's copy of a prompt table, resuming a worker's trainer, and
prompt tables written for the workers to read."""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayrec.console import Progress, emit, report_end, report_epoch, send_to_driver
from rayrec.data.atomic import atomic_path
from rayrec.tracking.mlflow_tracking import Tracker
from rayrec.train.checkpoint import seed_everything
from rayrec.workers import quiet_worker_logs, rank_and_world, resume_checkpoint, worker_tracker


@dataclass
class HFWorker:
    """What an HF trainer's Ray Train worker starts from."""

    cfg: Any  # the job, validated
    rank: int
    tracker: Tracker  # rank 0: the run's MLflow run; others: a null tracker
    output_dir: Path  # the trainer's own checkpoints on this node (Ray keeps the reported ones)
    show: bool  # this worker draws the progress (rank 0, when the driver shows a console)


def setup_hf_worker(config: dict[str, Any], schema: type, name: str) -> HFWorker:
    """Quiet logs, the console stream, the job as ``schema`` (its seed set), rank, MLflow and a scratch folder."""
    import datasets

    quiet_worker_logs()
    send_to_driver(bool(config.get("console")))
    datasets.disable_progress_bars()
    rank, _ = rank_and_world()
    cfg = schema.model_validate(config["job"])
    seed_everything(cfg.run.seed)  # before the model is built: resizing for the SID rows draws from torch's RNG
    output_dir = Path(tempfile.gettempdir()) / f"rayrec_{name}" / config["run_name"] / f"rank_{rank}"
    return HFWorker(cfg, rank, worker_tracker(config, rank), output_dir, show=rank == 0 and bool(config.get("console")))


def console_callback(line_on: str = "epoch"):
    """Rank 0's progress (optimizer steps) and one line per epoch, after its evaluation
    (``line_on="save"``: one line per checkpoint, headed by the step, for step-based runs like GRPO)."""
    from transformers import TrainerCallback

    class Console(TrainerCallback):
        progress: Progress | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                epochs = max(1, math.ceil(state.num_train_epochs or args.num_train_epochs))
                self.progress = Progress(state.max_steps, epochs, initial=state.global_step, send=emit)

        def on_step_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                self.progress.update(state.global_step, _epoch(state))

        def on_epoch_end(self, args, state, control, **kwargs):
            if self.progress is not None and args.eval_strategy == "no" and line_on == "epoch":
                self._line(state)

        def on_evaluate(self, args, state, control, **kwargs):
            if self.progress is not None and line_on == "epoch":
                self._line(state)

        def on_save(self, args, state, control, **kwargs):
            if self.progress is not None and line_on == "save":
                self._line(state, {"at_step": state.global_step, "max_steps": state.max_steps})

        def on_train_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                report_end()

        def _line(self, state, extra: dict | None = None) -> None:
            merged: dict[str, Any] = {}
            for entry in state.log_history:
                merged.update(entry)
            report_epoch({**merged, "epoch": _epoch(state), **(extra or {})})

    return Console()


def _epoch(state) -> int:
    """The epoch in progress (1-based); at an epoch's end HF's float epoch is that epoch."""
    return max(1, round(state.epoch or 0))


def single_process_group() -> None:
    """A one-process gloo group on this host, for DeepSpeed outside Ray (``--local``, tests)."""
    import os
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:  # a free port, so parallel runs on one host do not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                 "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}.items():
        os.environ.setdefault(k, v)
    dist.init_process_group("gloo")


def best_local(log_history: list[dict], folder: Path, metric: str, mode: str) -> str | None:
    """The saved checkpoint best by ``metric`` (the last one when none was scored)."""
    saved = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    values = {int(e["step"]): e[metric] for e in log_history if metric in e}
    scored = [p for p in saved if int(p.name.split("-")[1]) in values]
    if scored:
        pick = max if mode == "max" else min
        return str(pick(scored, key=lambda p: values[int(p.name.split("-")[1])]))
    return str(saved[-1]) if saved else None


def chosen_metrics(log_history: list[dict], checkpoint: str | None) -> dict[str, float]:
    """The validation scores logged at the step of ``checkpoint`` (``.../checkpoint-STEP``): what the
    chosen checkpoint scored, not the last one."""
    if checkpoint is None:
        return {}
    step = int(Path(checkpoint).name.split("-")[1])
    out: dict[str, float] = {}
    for e in log_history:
        if int(e.get("step", -1)) == step:
            out.update({k: float(v) for k, v in e.items() if k.startswith("val/")})
    return out


def dataset_rows(key: str) -> list[dict[str, Any]] | None:
    """This worker's full copy of a prompt table (None when the job has no such table)."""
    import ray.train

    try:
        shard = ray.train.get_dataset_shard(key)
    except (KeyError, ValueError):
        return None
    return None if shard is None else list(shard.iter_rows())


def train_resuming(trainer, resume_from: str | None) -> None:
    """A Ray Train worker's HF trainer: ``train()``, from the run's checkpoint when resuming."""
    from ray.train.huggingface.transformers import RayTrainReportCallback

    checkpoint = resume_checkpoint(resume_from)
    if checkpoint is None:
        trainer.train()
        return
    with checkpoint.as_directory() as d:
        inner = Path(d) / RayTrainReportCallback.CHECKPOINT_NAME  # Ray's layout; a bare HF folder works too
        trainer.train(resume_from_checkpoint=str(inner if inner.is_dir() else d))


def write_table(frame, path: Path) -> str:
    """``frame`` as Parquet at ``path``, written atomically."""
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)
    return str(path.resolve())
