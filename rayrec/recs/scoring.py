"""Scoring a batch of histories: the top-K items of the sequential, multi-interest and joint models.

A batch is ``{"key": [B] int64, "user_idx": [B] int64, "history": [B] lists of item_idx}``; the
answer is ``{"key", "rank", "item_idx", "score"}`` with up to K rows per key (fewer for a user with
fewer than K items left to recommend). ``key`` is the caller's row id (the output maps it back to a
raw user id); ``user_idx`` is what the model reads (the joint model's user text; 0 = a user the
model never saw). Items are ranked by score, ties by the lower item index; padding and (unless
``include_seen``) every item of the history are never recommended.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch


def top_k(scores: torch.Tensor, seen: list[np.ndarray] | None, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scores # [B, N+1] -> (item_idx [B, k], score [B, k]), best first, ties by the lower index;
    column 0 (padding) and the ``seen`` items of each row score -inf."""
    scores = scores.float().clone()
    scores[:, 0] = -torch.inf
    if seen is not None:
        rows = np.repeat(np.arange(len(seen)), [len(s) for s in seen])
        cols = np.concatenate(seen) if len(seen) else np.zeros(0, dtype=np.int64)
        scores[torch.from_numpy(rows).to(scores.device), torch.from_numpy(cols.astype(np.int64)).to(scores.device)] = -torch.inf
    return ranked_top(scores, k)


def ranked_top(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best columns of each row of ``scores`` [B, N], best first, ties to the lower index: what
    a stable sort of the whole row gives, in linear time. ``topk`` picks k columns; where more columns
    tie with its k-th value than places are left for them (rare but for -inf tails), the lowest-indexed
    of them are taken instead; only the k chosen are then sorted."""
    vals, items = torch.topk(scores, k, dim=1)  # [B, k], any order among equal values
    kth = vals[:, -1:]
    redo = (scores >= kth).sum(dim=1, dtype=torch.int32) > k  # more columns tie with the k-th than it took
    if redo.any():
        rows = redo.nonzero().squeeze(1)
        sub, cut = scores[rows], kth[rows]
        tied = sub == cut
        room = k - (sub > cut).sum(dim=1, keepdim=True)  # places left for the columns equal to the k-th value
        chosen = (sub > cut) | (tied & (tied.cumsum(dim=1) <= room))
        items[rows] = chosen.nonzero()[:, 1].reshape(-1, k)
    items = items.sort(dim=1).values  # ascending index, so the stable sort below breaks ties by it
    top = scores.gather(1, items)
    order = torch.sort(-top, dim=1, stable=True).indices
    return items.gather(1, order), top.gather(1, order)


def as_rows(keys: np.ndarray, items: torch.Tensor, scores: torch.Tensor) -> dict[str, np.ndarray]:
    """[B, k] results -> flat rows, without the -inf ones (a user with fewer than k items left). Narrow
    types (int32, the scores' own float) keep what actors send back small; the output widens them."""
    b, k = items.shape
    score = scores.reshape(-1).numpy()
    keep = np.isfinite(score)
    return {"key": np.repeat(np.asarray(keys, dtype=np.int32), k)[keep],
            "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), b)[keep],
            "item_idx": items.reshape(-1).numpy().astype(np.int32)[keep], "score": score[keep]}


def column(values) -> np.ndarray:
    """An int64 column of a numpy or an Arrow batch."""
    if hasattr(values, "to_numpy") and not isinstance(values, np.ndarray):
        values = values.to_numpy()
    return np.asarray(values, dtype=np.int64)


def job_of(state: dict[str, Any]):
    """The resolved job a checkpoint was trained with."""
    import yaml

    from rayrec.config.schema import JobConfig

    return JobConfig.model_validate(yaml.safe_load(state["config"]))


def popular_top(counts: torch.Tensor, keys: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """The ``k`` items of highest ``counts`` [N+1] (ties to the lower index) for every key: the answer
    for a history with no item the model knows."""
    items, top = top_k(counts.double()[None, :].expand(len(keys), -1), None, k)
    return as_rows(keys, items, top)


def load_scorer(checkpoint: str | Path, data_path: str | Path | None = None, num_items: int | None = None):
    """(model in eval mode, resolved job, num_items) from a checkpoint's best weights.

    ``data_path`` (default: the job's ``data.path``) is where what the model reads besides its
    weights comes from (the joint model's features) and, without ``num_items``, the item count; an
    exported model passes its own copy and its ``num_items``.
    """
    from rayrec.runs import local_checkpoint
    from rayrec.train.checkpoint import load_state
    from rayrec.train.inputs import DataInfo
    from rayrec.train.specs import build
    from rayrec.train.state import load_model_weights

    state = load_state(local_checkpoint(checkpoint))  # an object-store checkpoint: this process's copy
    cfg = job_of(state)
    data_path = Path(data_path or cfg.data.path)
    if num_items is None:
        from rayrec.data.dataset import open_prepared

        num_items = open_prepared(data_path).num_items
    model = build(cfg, DataInfo(path=str(data_path), num_items=num_items, train_rows=0, seen_len=0))
    load_model_weights(model, state.get("best_model") or state["model"], f"checkpoint {checkpoint}")
    return model.eval(), cfg, num_items


class Recommender:
    """The top-K of a batch of histories (module docstring), with a checkpoint's best weights.

    Built once per Ray Data actor (or once in this process).
    """

    def __init__(self, checkpoint: str, k: int, include_seen: bool, data_path: str | None = None,
                 num_items: int | None = None) -> None:
        torch.set_num_threads(max(1, int(os.environ.get("RAYREC_RECS_THREADS", "1"))))
        self.model, self.cfg, self.num_items = load_scorer(checkpoint, data_path, num_items)
        gpu = self.cfg.scaling.use_gpu and torch.cuda.is_available()  # a GPU job's actor holds one (num_gpus)
        self.device = torch.device("cuda" if gpu else "cpu")
        self.model.to(self.device)
        self.k, self.include_seen = k, include_seen

    def __call__(self, batch: dict[str, Any], k: int | None = None, include_seen: bool | None = None
                 ) -> dict[str, np.ndarray]:
        from rayrec.data.rows import left_padded, ragged
        from rayrec.train.evaluation import score_rows

        k = self.k if k is None else k
        include_seen = self.include_seen if include_seen is None else include_seen
        values, offsets = ragged(batch["history"])  # numpy object rows, or Arrow's list column as it is
        history = left_padded(values, offsets, self.cfg.model.max_len)
        users = column(batch["user_idx"])
        rows = {"history": torch.from_numpy(history).to(self.device), "user_idx": torch.from_numpy(users).to(self.device)}
        with torch.inference_mode():
            scores = score_rows(self.model, rows)  # [B, N+1]
            seen = None if include_seen else np.split(values.astype(np.int64), offsets[1:-1])
            items, top = top_k(scores, seen, k)
        return as_rows(column(batch["key"]), items.cpu(), top.cpu())
