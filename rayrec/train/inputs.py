"""What a training run of the sequential and joint recipes reads, on Ray or in this process: the
prepared data's sizes (``DataInfo``), its splits as row tables, and the batches over them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

from rayrec.config.schema import JobConfig
from rayrec.data.dataset import Prepared
from rayrec.data.rows import RowTable, count_windows, eval_share, rank_share, split_table, train_lengths
from rayrec.data.rows import train_table as rows_train_table
from rayrec.data.streaming import Collate, TableLoader
from rayrec.errors import ConfigError


@dataclass(frozen=True)
class DataInfo:
    """What workers need to know about the prepared dataset (computed once on the driver)."""

    path: str
    num_items: int
    train_rows: int  # training windows (``train.windows``), all workers together
    seen_len: int
    eval_rows: int = 0  # rows of valid + test
    events: int = 0  # interactions of the prepared dataset


def data_info(ds: Prepared, cfg: JobConfig) -> DataInfo:
    """Sizes read from the prepared files (sequence lengths only: no Python object per user)."""
    check_fits(cfg, ds.num_items)
    lengths = train_lengths(str(ds.path))
    return DataInfo(path=str(ds.path.resolve()), num_items=ds.num_items,
                    train_rows=count_windows(lengths, cfg.model.max_len, cfg.train.windows, window_stride(cfg)),
                    seen_len=max(ds.max_history("valid"), ds.max_history("test")),
                    eval_rows=int(ds.manifest["counts"].get("valid_rows", 0)) + int(ds.manifest["counts"].get("test_rows", 0)),
                    events=int(ds.manifest["counts"].get("interactions", 0)))


def check_fits(cfg: JobConfig, num_items: int) -> None:
    """Cut-offs and sampled negatives the catalogue can give (else HR@K is 1.0 for any model, or the
    sampler allocates far more than there are items)."""
    big = [k for k in cfg.train.eval.ks if k >= num_items]
    if big:
        raise ConfigError(f"train.eval.ks has {big} but the dataset has {num_items} items: HR@K would be 1.0 for any "
                          f"model; use cut-offs below {num_items}")
    mode = cfg.train.eval.mode
    if mode.startswith("sampled:") and int(mode.split(":")[1]) >= num_items:
        raise ConfigError(f"train.eval.mode {mode}: more negatives than the {num_items} items of the dataset; use "
                          f"sampled:N with N < {num_items} (or full)")


def window_stride(cfg: JobConfig) -> int:
    return cfg.train.window_stride or cfg.model.max_len


def train_table(cfg: JobConfig, info: DataInfo) -> RowTable:
    return rows_train_table(info.path, max_len=cfg.model.max_len, windows=cfg.train.windows, stride=window_stride(cfg))


def eval_table(cfg: JobConfig, info: DataInfo, split: str) -> RowTable:
    return split_table(info.path, split, max_len=cfg.model.max_len, seen_len=info.seen_len)


def row_tables(cfg: JobConfig, info: DataInfo) -> dict[str, RowTable]:
    """The three splits as in-memory row tables (read and transformed once)."""
    return {"train": train_table(cfg, info), "valid": eval_table(cfg, info, "valid"), "test": eval_table(cfg, info, "test")}


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


class TableBatches:
    """``Batches`` over in-memory row tables: this worker's share of every split.

    Train: the epoch's seeded order (``rows.epoch_order``), every ``world``-th row from ``rank``
    (wrapped to a multiple of ``world``, so ranks take equal steps). Valid/test: a contiguous
    share, so the workers together evaluate every row once (their metric sums are all-reduced).
    """

    def __init__(self, cfg: JobConfig, info: DataInfo, tables: dict[str, RowTable], rank: int = 0, world: int = 1) -> None:
        self.cfg, self.info, self.tables, self.rank, self.world = cfg, info, tables, rank, world
        self._train = TableLoader(tables["train"], batch_size=cfg.train.batch_size, collate=collate_for(cfg, info),
                                  shuffle_buffer=cfg.train.shuffle_buffer, share=partial(rank_share, rank=rank, world=world))

    def train(self, epoch: int) -> TableLoader:
        self._train.collate = collate_for(self.cfg, self.info, epoch)
        return self._train

    def valid(self) -> TableLoader:
        return self._eval("valid")

    def test(self) -> TableLoader:
        return self._eval("test")

    def _eval(self, split: str) -> TableLoader:
        share = eval_share(len(self.tables[split]), self.rank, self.world)
        return TableLoader(self.tables[split], batch_size=self.cfg.train.eval.batch_size,
                           collate=collate_for(self.cfg, self.info), share=lambda order: order[share])

    def describe(self) -> str:
        t = self.tables
        mb = sum(x.nbytes for x in t.values()) / 2**20
        return (f"{len(t['train']):,} training windows ({self.cfg.train.windows}), {len(t['valid']):,} valid and "
                f"{len(t['test']):,} test rows, {mb:,.1f} MiB")
