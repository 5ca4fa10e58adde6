"""Pieces shared by the Ray worker and the local (no-Ray) runner."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from rayrec.config.schema import JobConfig
from rayrec.data.streaming import Collate
from rayrec.models import build_model


@dataclass(frozen=True)
class DataInfo:
    """What workers need to know about the prepared dataset (computed once on the driver)."""

    path: str
    num_items: int
    train_rows: int
    seen_len: int


def build(cfg: JobConfig, info: DataInfo) -> nn.Module:
    if cfg.model.name == "ur4rec":  # the joint model loads its feature tables from the dataset folder
        from rayrec.train.joint import build_joint

        return build_joint(cfg, info.num_items, info.path)
    return build_model(cfg.model, info.num_items)


def num_negatives(cfg: JobConfig) -> int:
    """Negatives the data path draws per position (sampled losses only)."""
    loss = getattr(cfg.model, "loss", None)
    return loss.num_negatives if loss is not None and loss.name != "ce" else 0


def collate_for(cfg: JobConfig, info: DataInfo, epoch: int = 0) -> Collate:
    return Collate(num_items=info.num_items, num_negatives=num_negatives(cfg), seed=cfg.run.seed, epoch=epoch)


def steps_per_epoch(cfg: JobConfig, info: DataInfo) -> int:
    """Optimizer steps per epoch on one worker (for the LR schedule)."""
    rows = math.ceil(info.train_rows / cfg.scaling.num_workers)
    return max(1, math.ceil(math.ceil(rows / cfg.train.batch_size) / cfg.train.grad_accum))


def has_parameters(model: nn.Module) -> bool:
    return any(p.requires_grad for p in model.parameters())


class ListReporter:
    """Reporter that keeps metrics in memory and the latest state (local runs, tests)."""

    def __init__(self, on_state=None) -> None:
        self.metrics: list[dict[str, float]] = []
        self.states: list[dict[str, Any]] = []
        self.on_state = on_state

    def report(self, metrics: dict[str, float], state: dict[str, Any] | None) -> None:
        self.metrics.append(dict(metrics))
        if state is not None:
            self.states.append(state)
            if self.on_state:
                self.on_state(metrics, state)


def tqdm_progress(desc: str, total: int, factory) -> Any:
    """Wrap an iterable in a per-epoch progress bar made by ``factory`` (tqdm or tqdm_ray)."""
    def wrap(it: Iterable, epoch: int) -> Iterable:
        bar = factory(it, total=total, desc=f"{desc} epoch {epoch}")
        return bar
    return wrap
