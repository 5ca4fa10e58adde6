"""Pieces shared by the Ray workers and the local (no-Ray) runner of the sequential and joint recipes."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from rayrec.config.schema import JobConfig
from rayrec.data.dataset import Prepared
from rayrec.data.streaming import Collate
from rayrec.models import build_model


@dataclass(frozen=True)
class DataInfo:
    """What workers need to know about the prepared dataset (computed once on the driver)."""

    path: str
    num_items: int
    train_rows: int
    seen_len: int


def data_info(ds: Prepared) -> DataInfo:
    return DataInfo(path=str(ds.path.resolve()), num_items=ds.num_items,
                    train_rows=int(ds.manifest["counts"]["train_users"]),
                    seen_len=max(ds.max_history("valid"), ds.max_history("test")))


def _joint(cfg: JobConfig, info: DataInfo) -> nn.Module:
    from rayrec.train.joint import build_joint

    return build_joint(cfg, info.num_items, info.path)


#: models whose builder reads more than the config and the item count (a plain dict, by model name):
#: the joint model loads its feature tables from the dataset folder
DATA_BUILDERS: dict[str, Callable[[JobConfig, DataInfo], nn.Module]] = {"ur4rec": _joint}


def build(cfg: JobConfig, info: DataInfo) -> nn.Module:
    """The job's model over the prepared data ``info`` describes."""
    builder = DATA_BUILDERS.get(cfg.model.name)
    return builder(cfg, info) if builder else build_model(cfg.model, info.num_items)


def num_negatives(cfg: JobConfig) -> int:
    """Negatives the data path draws per position (sampled losses only)."""
    loss = getattr(cfg.model, "loss", None)
    return loss.num_negatives if loss is not None and loss.name != "ce" else 0


def collate_for(cfg: JobConfig, info: DataInfo, epoch: int = 0) -> Collate:
    return Collate(num_items=info.num_items, num_negatives=num_negatives(cfg), seed=cfg.run.seed, epoch=epoch)


def micro_batches_per_epoch(cfg: JobConfig, info: DataInfo) -> int:
    """Training batches one worker reads an epoch (the progress bar's unit)."""
    return max(1, math.ceil(math.ceil(info.train_rows / cfg.scaling.num_workers) / cfg.train.batch_size))


def steps_per_epoch(cfg: JobConfig, info: DataInfo) -> int:
    """Optimizer steps per epoch on one worker (for the LR schedule)."""
    return max(1, math.ceil(micro_batches_per_epoch(cfg, info) / cfg.train.grad_accum))


def has_parameters(model: nn.Module) -> bool:
    return any(p.requires_grad for p in model.parameters())
