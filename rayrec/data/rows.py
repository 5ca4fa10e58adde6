"""The rows a model trains and evaluates on, as numpy arrays: training windows, evaluation rows.

One set of functions serves both data paths:

- in memory: a split is read once per run, turned into a ``RowTable`` (numpy arrays, no Python
  object per row) and, on Ray, put in the object store, where every worker of the run (and every
  trial of a sweep) reads it without a copy;
- streaming: Ray Data runs the same transforms block by block (``rayrec.data.streaming``).

Training windows: a user's training sequence ``s`` of length ``n`` has ``T = n - 1`` next-item
positions (input ``s[:-1]``, target ``s[1:]``). ``windows="last"`` keeps the last ``max_len``
of them; ``"sliding"`` adds windows ending ``stride``, ``2 * stride``, ... positions earlier until
the first position is covered, so with ``stride == max_len`` every training event is a target
exactly once. Windows are left-padded with 0 (most recent position last) and ordered user by
user, oldest window first.

Shuffling (``epoch_order``): rows in file order are cut into chunks of ``buffer`` rows and each
chunk is permuted by ``default_rng([seed, epoch, chunk])``. A stream can do the same chunk by
chunk, so the in-memory and streaming paths yield the same batches for the same seed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

Windows = Literal["last", "sliding"]

_CHUNK = 1 << 16  # windows gathered at a time (bounds the [W, L] index temporaries)


def ragged(column: Any) -> tuple[np.ndarray, np.ndarray]:
    """A list column (pyarrow list array or chunked array, or numpy object array of sequences)
    as ``(values int64 [E], offsets int64 [N + 1])``."""
    if isinstance(column, (pa.ChunkedArray, pa.Array)):
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        values = pc.list_flatten(column).to_numpy(zero_copy_only=False)
    else:
        seqs = [np.asarray(s, dtype=np.int64) for s in column]
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        values = np.concatenate(seqs) if seqs else np.zeros(0, np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(np.nan_to_num(lengths, nan=0).astype(np.int64), out=offsets[1:])
    return values.astype(np.int64, copy=False), offsets


def windows_per_user(lengths: np.ndarray, max_len: int, windows: Windows, stride: int) -> np.ndarray:
    """Training windows of each user (``lengths``: training sequence lengths); at least 1."""
    positions = np.maximum(np.asarray(lengths, dtype=np.int64) - 1, 0)
    if windows == "last":
        return np.ones(len(positions), dtype=np.int64)
    extra = -(-(positions - max_len) // stride)  # ceil((T - max_len) / stride)
    return 1 + np.maximum(extra, 0)


def count_windows(lengths: np.ndarray, max_len: int, windows: Windows, stride: int) -> int:
    return int(windows_per_user(lengths, max_len, windows, stride).sum())


def _gather_left(values: np.ndarray, start: np.ndarray, end: np.ndarray, width: int, shift: int = 0) -> np.ndarray:
    """``values[start:end]`` per row, its last ``width`` entries, left-padded with 0  # -> [R, width].

    ``shift`` reads ``values[i + shift]`` for each position ``i`` (the targets, one step ahead).
    """
    pos = end[:, None] - width + np.arange(width, dtype=np.int64)[None, :]  # [R, width]
    valid = pos >= start[:, None]
    if not len(values):
        return np.zeros(pos.shape, dtype=np.int64)
    idx = np.clip(np.where(valid, pos, 0) + shift, 0, len(values) - 1)
    return np.where(valid, values[idx], 0)


def left_padded(values: np.ndarray, offsets: np.ndarray, width: int) -> np.ndarray:
    """The last ``width`` values of each ragged row, left-padded with 0  # -> [N, width] int64."""
    return _gather_left(values, offsets[:-1], offsets[1:], width)


def train_windows(values: np.ndarray, offsets: np.ndarray, user_idx: np.ndarray, *, max_len: int,
                  windows: Windows = "last", stride: int | None = None) -> dict[str, np.ndarray]:
    """Training rows of the users' sequences (``ragged`` form): ``user_idx [W]``, ``window_end [W]``
    (the window's last position + 1, so (user, end) names a window), ``input_ids [W, L]`` and
    ``targets [W, L]`` (0 = no target)."""
    stride = stride or max_len
    lengths = np.diff(offsets)
    per_user = windows_per_user(lengths, max_len, windows, stride)
    owner = np.repeat(np.arange(len(lengths)), per_user)
    first = np.cumsum(per_user) - per_user
    back = per_user[owner] - 1 - (np.arange(len(owner)) - first[owner])  # windows after this one
    positions = np.maximum(lengths - 1, 0)
    end = positions[owner] - back * stride  # input positions [end - max_len, end) of the user's sequence
    inputs = np.zeros((len(owner), max_len), dtype=np.int64)
    targets = np.zeros_like(inputs)
    for lo in range(0, len(owner), _CHUNK):
        o, e = owner[lo : lo + _CHUNK], end[lo : lo + _CHUNK]
        start = offsets[o]
        inputs[lo : lo + _CHUNK] = _gather_left(values, start, start + e, max_len)
        targets[lo : lo + _CHUNK] = _gather_left(values, start, start + e, max_len, shift=1)
    return {"user_idx": np.asarray(user_idx, dtype=np.int64)[owner], "window_end": end,
            "input_ids": inputs, "targets": targets}


@dataclass
class RowTable:
    """One split's rows: ``dense`` columns ``[N, ...]`` and ``ragged`` ones stored as
    ``(values, offsets)`` and left-padded to ``widths[name]`` only for the rows a batch takes
    (an evaluation row's whole history, to mask seen items, can be thousands of items long)."""

    dense: dict[str, np.ndarray]
    ragged: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    widths: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(next(iter(self.dense.values())))

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.dense.values()) + sum(v.nbytes + o.nbytes for v, o in self.ragged.values())

    def take(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        out = {k: v[idx] for k, v in self.dense.items()}
        for k, (values, offsets) in self.ragged.items():
            out[k] = _gather_left(values, offsets[idx], offsets[idx + 1], self.widths[k])
        return out


def eval_table(values: np.ndarray, offsets: np.ndarray, user_idx: np.ndarray, target: np.ndarray, *,
               max_len: int, seen_len: int) -> RowTable:
    """Evaluation rows: ``history [N, max_len]`` (model input), ``seen [N, seen_len]`` (to mask,
    padded per batch), ``target [N]``, ``user_idx [N]``."""
    history = _gather_left(values, offsets[:-1], offsets[1:], max_len)
    return RowTable(dense={"user_idx": np.asarray(user_idx, dtype=np.int64), "history": history,
                           "target": np.asarray(target, dtype=np.int64)},
                    ragged={"seen": (values, offsets)}, widths={"seen": max(1, seen_len)})


def read_split(path: str, split: str, columns: list[str]) -> pa.Table:
    return pq.read_table(f"{path}/{split}.parquet", columns=columns)


def train_table(path: str, *, max_len: int, windows: Windows, stride: int | None) -> RowTable:
    t = read_split(path, "train", ["user_idx", "seq"])
    values, offsets = ragged(t.column("seq"))
    return RowTable(train_windows(values, offsets, t.column("user_idx").to_numpy(), max_len=max_len,
                                  windows=windows, stride=stride))


def split_table(path: str, split: str, *, max_len: int, seen_len: int) -> RowTable:
    t = read_split(path, split, ["user_idx", "history", "target"])
    values, offsets = ragged(t.column("history"))
    return eval_table(values, offsets, t.column("user_idx").to_numpy(), t.column("target").to_numpy(),
                      max_len=max_len, seen_len=seen_len)


def train_lengths(path: str) -> np.ndarray:
    """Length of each user's training sequence (no Python object per user)."""
    t = read_split(path, "train", ["seq"])
    return pc.list_value_length(t.column("seq")).to_numpy(zero_copy_only=False).astype(np.int64)


# ----------------------------------------------------------------------------- order and shares


def chunk_permutation(n: int, *, seed: int, epoch: int, index: int) -> np.ndarray:
    """The permutation of the ``index``-th chunk (``n`` rows) of an epoch."""
    return np.random.default_rng([seed, epoch, index]).permutation(n)


def epoch_order(n: int, *, seed: int, epoch: int, buffer: int) -> np.ndarray:
    """Row order of an epoch: file order, each chunk of ``buffer`` rows permuted (0 = file order)."""
    order = np.arange(n)
    if buffer <= 0:
        return order
    for index, lo in enumerate(range(0, n, buffer)):
        size = min(buffer, n - lo)
        order[lo : lo + size] = lo + chunk_permutation(size, seed=seed, epoch=epoch, index=index)
    return order


def rank_share(order: np.ndarray, rank: int, world: int) -> np.ndarray:
    """A training worker's rows: every ``world``-th of ``order`` from ``rank``, the order wrapped
    around to a multiple of ``world`` first (as ``DistributedSampler``), so every rank takes the
    same number of steps and no row is left out."""
    if world == 1:
        return order
    pad = -len(order) % world
    if pad:
        order = np.concatenate([order, order[:pad]])
    return order[rank::world]


def eval_share(n: int, rank: int, world: int) -> np.ndarray:
    """A worker's contiguous share of ``n`` evaluation rows; the shares cover every row once."""
    return np.arange(n * rank // world, n * (rank + 1) // world)


def batches(table: RowTable, order: np.ndarray, batch_size: int, *, drop_last: bool = False) -> Iterator[dict[str, np.ndarray]]:
    for lo in range(0, len(order), batch_size):
        idx = order[lo : lo + batch_size]
        if drop_last and len(idx) < batch_size:
            return
        yield table.take(idx)


def num_batches(rows: int, batch_size: int, drop_last: bool = False) -> int:
    full, rest = divmod(rows, batch_size)
    return full + (0 if drop_last or not rest else 1)
