"""Batches for training and evaluation: from in-memory row tables, or streamed by Ray Data.

Both paths use the transforms of ``rayrec.data.rows`` and the same seeded chunk shuffle, so a
worker reading a Ray Data shard sees exactly the batches the in-memory path yields for the same
rows, order and seed (tests check).

Layout: histories are LEFT-padded with 0 (most recent item last).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch

from rayrec.data import rows as R


def train_rows(batch: dict[str, Any], max_len: int, windows: R.Windows = "last", stride: int | None = None) -> dict[str, np.ndarray]:
    """User sequences -> next-item training windows (``rows.train_windows``).

    Returns ``user_idx [W]``, ``window_end [W]``, ``input_ids [W, L]``, ``targets [W, L]`` (0 = no target).
    """
    values, offsets = R.ragged(batch["seq"])
    return R.train_windows(values, offsets, np.asarray(batch["user_idx"]), max_len=max_len, windows=windows, stride=stride)


def eval_rows(batch: dict[str, Any], max_len: int, seen_len: int) -> dict[str, np.ndarray]:
    """Prediction rows -> ``history [B, L]`` (model input), ``seen [B, S]`` (to mask), ``target [B]``."""
    values, offsets = R.ragged(batch["history"])
    table = R.eval_table(values, offsets, np.asarray(batch["user_idx"]), np.asarray(batch["target"]),
                         max_len=max_len, seen_len=seen_len)
    return table.take(np.arange(len(table)))


@dataclass
class Collate:
    """numpy batch -> torch tensors, drawing ``num_negatives`` per position if asked.

    Negatives are uniform over 1..num_items and seeded by (seed, epoch, the batch's first window:
    user and end), so the same rows give the same negatives on any path.
    """

    num_items: int = 0
    num_negatives: int = 0
    seed: int = 0
    epoch: int = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        out = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in batch.items()}
        if self.num_negatives and "targets" in out:
            n = len(batch["user_idx"])
            first = [int(batch["user_idx"][0]), int(batch["window_end"][0]) if "window_end" in batch else 0] if n else [0, 0]
            rng = np.random.default_rng([self.seed, self.epoch, *first])
            shape = (*batch["targets"].shape, self.num_negatives)
            out["negatives"] = torch.as_tensor(rng.integers(1, self.num_items + 1, size=shape))
        return out


# ----------------------------------------------------------------------------- in memory


class TableLoader:
    """Batches of a ``RowTable``: the rows ``share(order)`` picks, in the epoch's seeded order.

    ``shuffle_buffer`` > 0 permutes chunks of that many rows (``rows.epoch_order``); ``share``
    maps the epoch's order to this worker's rows (``rows.rank_share``; all of them by default).
    """

    def __init__(self, table: R.RowTable, *, batch_size: int, collate: Collate, shuffle_buffer: int = 0,
                 share=lambda order: order, drop_last: bool = False) -> None:
        self.table, self.batch_size, self.collate = table, batch_size, collate
        self.shuffle_buffer, self.share, self.drop_last = shuffle_buffer, share, drop_last

    def order(self) -> np.ndarray:
        c = self.collate
        return self.share(R.epoch_order(len(self.table), seed=c.seed, epoch=c.epoch, buffer=self.shuffle_buffer))

    def __len__(self) -> int:
        return R.num_batches(len(self.share(np.arange(len(self.table)))), self.batch_size, self.drop_last)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in R.batches(self.table, self.order(), self.batch_size, drop_last=self.drop_last):
            yield self.collate(batch)


# ----------------------------------------------------------------------------- Ray Data


def ray_dataset(path: str, split: str, *, max_len: int, seen_len: int = 0, windows: R.Windows = "last",
                stride: int | None = None, override_num_blocks: int | None = None):
    """A lazy ``ray.data`` dataset of transformed rows for ``split`` of a prepared dir."""
    import ray.data

    ds = ray.data.read_parquet(f"{path}/{split}.parquet", override_num_blocks=override_num_blocks)
    # rows in file order, so a seed fixes the batches (shuffling is our seeded chunk shuffle)
    ds.context.execution_options.preserve_order = True
    if split == "train":
        fn = partial(train_rows, max_len=max_len, windows=windows, stride=stride)
    else:
        fn = partial(eval_rows, max_len=max_len, seen_len=seen_len)
    return ds.map_batches(fn, batch_format="pyarrow", zero_copy_batch=True)


def iter_shard(shard, *, batch_size: int, collate: Collate, shuffle_buffer: int = 0, drop_last: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of a worker's shard (``ray.train.get_dataset_shard(name)``), shuffled as ``TableLoader``
    shuffles: chunks of ``shuffle_buffer`` rows in stream order, each permuted by the same seed."""
    if shuffle_buffer <= 0:
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=drop_last, prefetch_batches=2):
            yield collate(batch)
        return
    pending: dict[str, np.ndarray] | None = None
    chunks = shard.iter_batches(batch_size=shuffle_buffer, batch_format="numpy", prefetch_batches=1)
    for index, chunk in enumerate(chunks):
        n = len(next(iter(chunk.values())))
        perm = R.chunk_permutation(n, seed=collate.seed, epoch=collate.epoch, index=index)
        chunk = {k: v[perm] for k, v in chunk.items()}
        pending = chunk if pending is None else {k: np.concatenate([pending[k], chunk[k]]) for k in chunk}
        while len(pending["user_idx"]) >= batch_size:
            yield collate({k: v[:batch_size] for k, v in pending.items()})
            pending = {k: v[batch_size:] for k, v in pending.items()}
    if pending is not None and len(pending["user_idx"]) and not drop_last:
        yield collate(pending)
