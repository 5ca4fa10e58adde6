"""Ray Train worker body for the joint (ur4rec) model.

Same batches, reporter and resume logic as the SASRec worker (``ray_trainer``), but no
DDP wrapper: which parameters train changes from step to step under alternation, so the
worker averages the trained parameters' gradients itself (one flat all-reduce per step)
after rank 0's initial weights are broadcast.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from rayrec.config.schema import JobConfig
from rayrec.tracking.mlflow_tracking import Tracker
from rayrec.train.checkpoint import resume_metrics
from rayrec.train.joint import fit_joint, no_sync
from rayrec.train.worker import DataInfo, steps_per_epoch

#: Progress-bar description refresh, in steps (each refresh is a message to the driver).
BAR_REFRESH = 5


def run_joint_worker(cfg: JobConfig, info: DataInfo, model, config: dict[str, Any], *, rank: int, world: int,
                     device: torch.device) -> None:
    """Train the joint model on this worker: broadcast weights, then ``fit_joint`` with Ray pieces."""
    from ray.experimental.tqdm_ray import tqdm

    from rayrec.train.ray_trainer import RayReporter, ShardBatches, _resume_state, all_reduce_sum

    model.to(device)
    broadcast_from_rank0(model)
    resume = _resume_state(config.get("resume_from"))
    tracker = Tracker(config.get("tracking_uri"), config.get("mlflow_run_id")) if rank == 0 else Tracker.null()
    if resume is not None:
        tracker.log_metrics(resume_metrics(resume), step=int(resume["epoch"]))
    steps = steps_per_epoch(cfg, info)
    bar = JointBar(tqdm, cfg.model.total_epochs, steps) if rank == 0 and config.get("progress", True) else None
    try:
        fit_joint(model, ShardBatches(cfg, info, rank, world), cfg, num_items=info.num_items, device=device,
                  reporter=RayReporter(rank, tracker), resume=resume, reduce=all_reduce_sum,
                  sync_grads=all_reduce_grads if world > 1 else no_sync, world_size=world, progress=bar,
                  steps_per_epoch=steps)
    finally:
        if bar is not None:
            bar.close()


def all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Average the gradients of ``params`` over workers in one flat all-reduce.

    A parameter without a gradient on this worker (unused by its batch) contributes zeros,
    so every worker reduces the same flat tensor.
    """
    import torch.distributed as dist

    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def broadcast_from_rank0(model: torch.nn.Module) -> None:
    """Start every worker from rank 0's weights (what DDP does at construction)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in model.state_dict().values():
            dist.broadcast(t, src=0)


class JointBar:
    """One tqdm_ray bar: epoch, stage and the trained module with its switch count."""

    def __init__(self, factory, epochs: int, steps: int) -> None:
        self.bar = factory(desc="epoch 1", total=epochs * steps)
        self.epochs = epochs

    def __call__(self, it: Iterable, epoch: int, describe: Callable[[], str]):
        for i, x in enumerate(it):
            if i % BAR_REFRESH == 0:
                self.bar.set_description(f"epoch {epoch}/{self.epochs} {describe()}")
            yield x
            self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
