"""Batches for training and evaluation, from Ray Data or from plain pandas.

The row transforms (``train_rows``/``eval_rows``) and the collate function are
shared by both paths, so a Ray Train worker reading its shard sees exactly the
batches the plain loader yields for the same rows, order and seed (tests check).

Layout: histories are LEFT-padded to ``max_len`` with 0 (most recent item last).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
import torch


def _left_pad(seqs: list[np.ndarray] | np.ndarray, width: int) -> np.ndarray:
    """Keep the last ``width`` items of each sequence, padded on the left with 0."""
    out = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        s = np.asarray(s, dtype=np.int64)[-width:]
        if len(s):
            out[i, width - len(s) :] = s
    return out


def train_rows(batch: dict[str, Any], max_len: int) -> dict[str, np.ndarray]:
    """User sequences -> next-item training pairs.

    input_ids = seq[:-1], targets = seq[1:], both the last ``max_len`` steps.
    Returns ``input_ids [B, L]``, ``targets [B, L]`` (0 = no target), ``user_idx [B]``.
    """
    seqs = batch["seq"]
    return {
        "user_idx": np.asarray(batch["user_idx"], dtype=np.int64),
        "input_ids": _left_pad([np.asarray(s)[:-1] for s in seqs], max_len),
        "targets": _left_pad([np.asarray(s)[1:] for s in seqs], max_len),
    }


def eval_rows(batch: dict[str, Any], max_len: int, seen_len: int) -> dict[str, np.ndarray]:
    """Prediction rows -> ``history [B, L]`` (model input), ``seen [B, S]`` (to mask), ``target [B]``."""
    hist = batch["history"]
    return {
        "user_idx": np.asarray(batch["user_idx"], dtype=np.int64),
        "history": _left_pad(hist, max_len),
        "seen": _left_pad(hist, seen_len),
        "target": np.asarray(batch["target"], dtype=np.int64),
    }


@dataclass
class Collate:
    """numpy batch -> torch tensors, drawing ``num_negatives`` per position if asked.

    Negatives are uniform over 1..num_items and seeded by (seed, epoch, first
    user in the batch), so the same rows give the same negatives on any path.
    """

    num_items: int = 0
    num_negatives: int = 0
    seed: int = 0
    epoch: int = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        out = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in batch.items()}
        if self.num_negatives and "targets" in out:
            first = int(batch["user_idx"][0]) if len(batch["user_idx"]) else 0
            rng = np.random.default_rng([self.seed, self.epoch, first])
            shape = (*batch["targets"].shape, self.num_negatives)
            out["negatives"] = torch.as_tensor(rng.integers(1, self.num_items + 1, size=shape))
        return out


# ----------------------------------------------------------------------------- Ray Data


def ray_dataset(path: str, split: str, *, max_len: int, seen_len: int = 0, override_num_blocks: int | None = None):
    """A lazy ``ray.data`` dataset of transformed rows for ``split`` of a prepared dir."""
    import ray.data

    ds = ray.data.read_parquet(f"{path}/{split}.parquet", override_num_blocks=override_num_blocks)
    # rows in file order, so a seed fixes the batches (shuffling is our local, seeded buffer)
    ds.context.execution_options.preserve_order = True
    if split == "train":
        fn = partial(train_rows, max_len=max_len)
    else:
        fn = partial(eval_rows, max_len=max_len, seen_len=seen_len)
    return ds.map_batches(fn, batch_format="numpy", zero_copy_batch=True)


def iter_shard(shard, *, batch_size: int, collate: Collate, shuffle_buffer: int = 0, drop_last: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of a worker's shard (``ray.train.get_dataset_shard(name)``)."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class RayCollate(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
            return collate(batch)

    shuffle = shuffle_buffer > 0
    return shard.iter_torch_batches(
        batch_size=batch_size,
        collate_fn=RayCollate(),
        drop_last=drop_last,
        local_shuffle_buffer_size=shuffle_buffer if shuffle else None,
        local_shuffle_seed=(collate.seed * 1000 + collate.epoch) if shuffle else None,
        prefetch_batches=2,
    )


# ----------------------------------------------------------------------------- plain


class PlainLoader:
    """The same batches without Ray: rows from a DataFrame, transformed once, in memory.

    ``shuffle`` permutes rows each epoch with ``np.random.default_rng([seed, epoch])``.
    """

    def __init__(self, df: pd.DataFrame, split: str, *, max_len: int, batch_size: int, collate: Collate, seen_len: int = 0, shuffle: bool = False, drop_last: bool = False):
        cols = {c: df[c].to_numpy() for c in df.columns}
        self.rows = train_rows(cols, max_len) if split == "train" else eval_rows(cols, max_len, seen_len)
        self.n = len(df)
        self.batch_size, self.collate, self.shuffle, self.drop_last = batch_size, collate, shuffle, drop_last

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (0 if self.drop_last or not rest else 1)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = np.arange(self.n)
        if self.shuffle:
            order = np.random.default_rng([self.collate.seed, self.collate.epoch]).permutation(self.n)
        for start in range(0, self.n, self.batch_size):
            idx = order[start : start + self.batch_size]
            if self.drop_last and len(idx) < self.batch_size:
                break
            yield self.collate({k: v[idx] for k, v in self.rows.items()})
