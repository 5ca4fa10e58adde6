"""Fresh histories for ``rayrec recommend --histories`` and the exported model: raw item ids -> item_idx.

A history file holds one row per event: ``user_id``, ``item_id`` and (optional) ``timestamp``, as CSV
or Parquet; a user's events are ordered by timestamp (stable: file order among equal times). Items
the model does not know are counted and skipped with one warning; a history with no known item is
left empty, and its user gets the popularity ranking (counted too).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from rayrec.errors import DataError

log = logging.getLogger(__name__)

COLUMNS = ("user_id", "item_id")


def read_histories(path: Path, item_index: dict[str, int]) -> tuple[pd.DataFrame, dict[str, int]]:
    """``user_id`` and ``history`` (item_idx lists, oldest first) per user of ``path``, and the counts."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--histories {path}: no such file")
    try:
        events = (pd.read_parquet(path) if path.suffix == ".parquet"
                  else pd.read_csv(path, dtype={"user_id": str, "item_id": str}))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise DataError(f"--histories {path}: unreadable ({type(e).__name__}: {e})") from None
    missing = [c for c in COLUMNS if c not in events.columns]
    if missing:
        raise DataError(f"--histories {path}: no column {', '.join(missing)} (it needs user_id, item_id and, "
                        f"optionally, timestamp; it has {', '.join(map(str, events.columns))})")
    if events.empty:
        raise DataError(f"--histories {path}: no events in it")
    if "timestamp" in events.columns:
        events = events.sort_values("timestamp", kind="stable")
    return map_histories(events["user_id"].astype(str), events["item_id"].astype(str), item_index,
                         source=f"--histories {path}")


def map_histories(users: pd.Series, items: pd.Series, item_index: dict[str, int], *, source: str
                  ) -> tuple[pd.DataFrame, dict[str, int]]:
    """Events (in order) -> one row per user (first-appearance order) with its known items' indices."""
    idx = items.map(item_index)
    unknown = int(idx.isna().sum())
    if unknown:
        log.warning("%s: %d of %d events name items the model does not know (e.g. %s); they are skipped",
                    source, unknown, len(items), items[idx.isna()].iloc[0])
    order = pd.unique(users)
    known = pd.DataFrame({"user_id": users.to_numpy(), "item": idx.to_numpy()}).dropna()
    grouped = known.groupby("user_id", sort=False)["item"].agg(lambda s: s.astype(np.int64).to_numpy())
    frame = pd.DataFrame({"user_id": order})
    frame["history"] = [grouped.get(u, np.zeros(0, dtype=np.int64)) for u in order]
    empty = int(frame["history"].map(len).eq(0).sum())
    if empty:
        log.warning("%s: %d users have no item the model knows; they get the most popular items", source, empty)
    return frame, {"unknown_items": unknown, "popularity_users": empty, "unknown_users": 0}
