"""Turn a source's ``RawData`` into the prepared dataset of the data contract.

Filters (rating threshold, k-core to a fixed point, sequence length bounds),
a split protocol, then ``items/train/valid/test.parquet`` + ``manifest.json``,
written into a temporary folder that is renamed into place only when complete.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

import rayrec
from rayrec.config.schema import FilterConfig, SplitProtocol
from rayrec.data.atomic import check_target, output_lock, replace_folder, temp_folder
from rayrec.data.sources.base import PreSplit, RawData
from rayrec.errors import DataError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
TRAIN_SCHEMA = pa.schema([("user_idx", pa.int32()), ("seq", pa.list_(pa.int32()))])
EVAL_SCHEMA = pa.schema(
    [("user_idx", pa.int32()), ("history", pa.list_(pa.int32())), ("target", pa.int32())]
)


def apply_filters(df: pd.DataFrame, f: FilterConfig) -> tuple[pd.DataFrame, dict[str, int]]:
    """Rating threshold, then user/item k-core and min length iterated to a fixed point.

    Returns the kept events and how many each step removed (for the manifest).
    """
    removed: dict[str, int] = {}
    if f.min_rating is not None:
        if df["rating"].isna().all():
            raise DataError(f"filters.min_rating={f.min_rating} is set but the source has no ratings")
        before = len(df)
        df = df[df["rating"] >= f.min_rating]
        removed["min_rating"] = before - len(df)
        _nonempty(df, f"filters.min_rating={f.min_rating}")
    user_min = max(f.user_core, f.min_seq_len)
    before = len(df)
    while True:
        n = len(df)
        if f.item_core > 1:
            df = df[df.groupby("item")["item"].transform("size") >= f.item_core]
            _nonempty(df, f"filters.item_core={f.item_core}")
        if user_min > 1:
            df = df[df.groupby("user")["user"].transform("size") >= user_min]
            _nonempty(df, f"filters.user_core={f.user_core}/min_seq_len={f.min_seq_len}")
        if len(df) == n:
            break
    removed["core_and_min_len"] = before - len(df)
    return df, removed


def _nonempty(df: pd.DataFrame, what: str) -> None:
    if df.empty:
        raise DataError(f"no interactions left after {what}; relax that filter")


def index_ids(values: pd.Series) -> dict[str, int]:
    """Map source ids to 1..N in natural order (numeric ids sorted as numbers)."""
    uniq = pd.unique(values.astype(str))
    key = pd.to_numeric(pd.Series(uniq), errors="coerce")
    order = np.lexsort((uniq, key.fillna(np.inf).to_numpy())) if key.notna().all() else np.argsort(uniq, kind="stable")
    return {uniq[i]: rank + 1 for rank, i in enumerate(order)}


def user_sequences(df: pd.DataFrame, max_seq_len: int | None) -> pd.DataFrame:
    """One row per user: ``user_idx``, chronological ``seq`` and ``ts`` (stable on ties)."""
    df = df.sort_values(["user_idx", "timestamp", "_order"], kind="stable")
    grouped = df.groupby("user_idx", sort=True)
    seqs = grouped["item_idx"].agg(list)
    ts = grouped["timestamp"].agg(list)
    out = pd.DataFrame({"user_idx": seqs.index.astype(np.int32), "seq": seqs.to_numpy(), "ts": ts.to_numpy()})
    if max_seq_len is not None:
        out["seq"] = [s[-max_seq_len:] for s in out["seq"]]
        out["ts"] = [t[-max_seq_len:] for t in out["ts"]]
    return out


def split_leave_one_out(users: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Last item -> test, second to last -> valid, the rest -> train (needs >= 3 events)."""
    short = users["seq"].map(len) < 3
    if short.any():
        raise DataError(f"leave_one_out needs >= 3 events per user; {int(short.sum())} users have fewer (set filters.min_seq_len >= 3)")
    train = pd.DataFrame({"user_idx": users["user_idx"], "seq": [s[:-2] for s in users["seq"]]})
    valid = pd.DataFrame({"user_idx": users["user_idx"], "history": [s[:-2] for s in users["seq"]], "target": [s[-2] for s in users["seq"]]})
    test = pd.DataFrame({"user_idx": users["user_idx"], "history": [s[:-1] for s in users["seq"]], "target": [s[-1] for s in users["seq"]]})
    return train, valid, test


def _segment_rows(users: pd.DataFrame, bounds: list[tuple[int, int]]) -> pd.DataFrame:
    """Prediction rows for events seq[a:b] of each user, history = everything before."""
    rows = [
        (u, seq[:i], seq[i])
        for u, seq, (a, b) in zip(users["user_idx"], users["seq"], bounds)
        for i in range(max(a, 1), b)
    ]
    return pd.DataFrame(rows, columns=["user_idx", "history", "target"])


def split_temporal(users: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Global time cut at the 80th/90th percentile of event times (MiniOneRec's 8:1:1)."""
    all_ts = np.concatenate([np.asarray(t) for t in users["ts"]])
    t80, t90 = np.quantile(all_ts, [0.8, 0.9])
    cut80 = [int(np.searchsorted(t, t80, side="right")) for t in users["ts"]]
    cut90 = [int(np.searchsorted(t, t90, side="right")) for t in users["ts"]]
    return _cut_split(users, cut80, cut90)


def split_user_prefix(users: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Per-user cut at 80 % and 90 % of each sequence (UR4Rec's protocol)."""
    n = users["seq"].map(len).to_numpy()
    cut80 = np.maximum(1, np.floor(0.8 * n)).astype(int).tolist()
    cut90 = np.maximum(cut80, np.floor(0.9 * n)).astype(int).tolist()
    return _cut_split(users, cut80, cut90)


def _cut_split(users: pd.DataFrame, cut80: list[int], cut90: list[int]):
    train = pd.DataFrame({"user_idx": users["user_idx"], "seq": [s[:c] for s, c in zip(users["seq"], cut80)]})
    train = train[train["seq"].map(len) > 0]
    valid = _segment_rows(users, list(zip(cut80, cut90)))
    test = _segment_rows(users, [(c, len(s)) for s, c in zip(users["seq"], cut90)])
    return train, valid, test


SPLITS: dict[str, Callable[[pd.DataFrame], tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]]] = {
    "leave_one_out": split_leave_one_out,
    "temporal": split_temporal,
    "user_prefix": split_user_prefix,
}


def items_table(item_map: dict[str, int], items: pd.DataFrame | None) -> pd.DataFrame:
    """``items.parquet`` rows for every kept item, metadata joined where the source has it."""
    out = pd.DataFrame({"item": list(item_map), "item_idx": np.array(list(item_map.values()), dtype=np.int32)})
    if items is not None:
        meta = items.drop_duplicates("item").assign(item=lambda d: d["item"].astype(str))
        out = out.merge(meta, on="item", how="left")
    if "title" not in out:
        out["title"] = None
    out["title"] = out["title"].fillna("item " + out["item"])
    out["text"] = out["text"].fillna("") if "text" in out else ""
    out = out.rename(columns={"item": "source_id"}).sort_values("item_idx").reset_index(drop=True)
    front = ["item_idx", "source_id", "title", "text"]
    return out[front + [c for c in out.columns if c not in front]]


def map_presplit(ps: PreSplit, item_map: dict[str, int], user_map: dict[str, int]):
    """Keep a source's own split, mapping source ids to indices."""
    def rows(df: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame({
            "user_idx": [user_map[str(u)] for u in df["user"]],
            "history": [[item_map[str(i)] for i in h] for h in df["history"]],
            "target": [item_map[str(t)] for t in df["target"]],
        })
    train = pd.DataFrame({
        "user_idx": [user_map[str(u)] for u in ps.train_seqs],
        "seq": [[item_map[str(i)] for i in s] for s in ps.train_seqs.values()],
    })
    return train, rows(ps.valid), rows(ps.test)


def hash_inputs(files: list[Path], params: dict[str, Any]) -> str:
    """sha256 over the raw input bytes (sorted by name) and the source parameters."""
    h = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode())
    for f in sorted(Path(p) for p in files):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _write_table(df: pd.DataFrame, path: Path, schema: pa.Schema) -> None:
    cols = {name: df[name].tolist() if isinstance(schema.field(name).type, pa.ListType) else df[name].to_numpy() for name in schema.names}
    pq.write_table(pa.table(cols, schema=schema), path)


def build(raw: RawData, filters: FilterConfig, split: SplitProtocol) -> dict[str, Any]:
    """Filter, index and split ``raw``; return the tables and manifest counts."""
    if raw.presplit is not None:
        return _build_presplit(raw)
    df = raw.interactions.assign(user=lambda d: d["user"].astype(str), item=lambda d: d["item"].astype(str))
    df = df.assign(_order=np.arange(len(df)))
    if df.empty:
        files = ", ".join(map(str, raw.input_files)) or "the source"
        raise DataError(f"no interactions in {files}: the file is empty, or every line was bad and skipped "
                        f"({raw.skipped_lines} skipped); check the input folder")
    repeated = df.duplicated(["user", "item", "timestamp"])
    duplicates = {"found": int(repeated.sum()), "dropped": int(repeated.sum()) if filters.drop_duplicates else 0}
    if duplicates["found"]:
        log.warning("%d repeated (user, item, timestamp) events %s", duplicates["found"],
                    "dropped (filters.drop_duplicates)" if filters.drop_duplicates
                    else "kept; --drop-duplicates (filters.drop_duplicates) drops them")
    if filters.drop_duplicates:
        df = df[~repeated]
    df, removed = apply_filters(df, filters)
    item_map, user_map = index_ids(df["item"]), index_ids(df["user"])
    df = df.assign(item_idx=df["item"].map(item_map).astype(np.int32), user_idx=df["user"].map(user_map).astype(np.int32))
    users = user_sequences(df, filters.max_seq_len)
    train, valid, test = SPLITS[split](users)
    return {"item_map": item_map, "user_map": user_map, "train": train, "valid": valid, "test": test,
            "removed": removed, "events": int(users["seq"].map(len).sum()), "duplicates": duplicates}


def _build_presplit(raw: RawData) -> dict[str, Any]:
    ps = raw.presplit
    assert ps is not None
    all_items = pd.Series([i for s in ps.train_seqs.values() for i in s]
                          + [i for h in pd.concat([ps.valid["history"], ps.test["history"]]) for i in h]
                          + list(ps.valid["target"]) + list(ps.test["target"]), dtype=str)
    if raw.items is not None:
        all_items = pd.concat([all_items, raw.items["item"].astype(str)])
    users = pd.Series(list(ps.train_seqs) + list(ps.valid["user"]) + list(ps.test["user"]), dtype=str)
    item_map, user_map = index_ids(all_items), index_ids(users)
    train, valid, test = map_presplit(ps, item_map, user_map)
    return {"item_map": item_map, "user_map": user_map, "train": train, "valid": valid, "test": test,
            "removed": {}, "events": int(train["seq"].map(len).sum())}


def prepare(
    read: Callable[[Path], RawData],
    out: Path,
    *,
    source: str,
    params: dict[str, Any],
    filters: FilterConfig,
    split: SplitProtocol,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Read, filter, split and write a dataset to ``out`` atomically; return the manifest.

    ``out`` must not be the input (nor hold it); an existing ``out`` is replaced only with
    ``overwrite`` and only when it is a prepared dataset (``rayrec.data.atomic``).

    ``read(workdir)`` is called with the temporary dataset folder so sources that
    produce files (synthetic images) write them inside the dataset.
    """
    out = Path(out)
    inputs = [Path(params["input"])] if params.get("input") else []
    check_target(out, overwrite=overwrite, marker="manifest.json", protect=inputs)
    with output_lock(out):  # one writer per output; a second one fails here with a clear message
        tmp = temp_folder(out)
        try:
            raw = read(tmp)
            tables = build(raw, filters, split)
            items = items_table(tables["item_map"], raw.items)
            pq.write_table(pa.Table.from_pandas(items, preserve_index=False), tmp / "items.parquet")
            _write_table(tables["train"], tmp / "train.parquet", TRAIN_SCHEMA)
            _write_table(tables["valid"], tmp / "valid.parquet", EVAL_SCHEMA)
            _write_table(tables["test"], tmp / "test.parquet", EVAL_SCHEMA)
            if raw.users is not None and "pref_text" in raw.users:
                _write_users(raw.users, tables["user_map"], tmp / "users.parquet")
            manifest = _manifest(raw, tables, source=source, params=params, filters=filters, split=split)
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
            replace_folder(tmp, out, overwrite=overwrite)  # the old output stays whole until the new one is in
            return manifest
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _write_users(users: pd.DataFrame, user_map: dict[str, int], path: Path) -> None:
    u = users.assign(user=users["user"].astype(str))
    u = u[u["user"].isin(user_map)]
    u = u.assign(user_idx=u["user"].map(user_map).astype(np.int32)).rename(columns={"user": "source_id"})
    pq.write_table(pa.Table.from_pandas(u.sort_values("user_idx"), preserve_index=False), path)


def _manifest(raw: RawData, tables: dict[str, Any], *, source: str, params: dict[str, Any], filters: FilterConfig, split: str) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "rayrec_version": rayrec.__version__,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "params": params,
        "filters": filters.model_dump(),
        "split": "as_given" if raw.presplit is not None else split,
        "counts": {
            "users": len(tables["user_map"]),
            "items": len(tables["item_map"]),
            "interactions": tables["events"],
            "train_users": len(tables["train"]),
            "valid_rows": len(tables["valid"]),
            "test_rows": len(tables["test"]),
        },
        "removed_by_filter": tables["removed"],
        "duplicates": tables.get("duplicates", {"found": 0, "dropped": 0}),
        "skipped_lines": raw.skipped_lines,
        "missing": raw.missing,
        "input_files": [str(p) for p in raw.input_files],
        "input_hash": hash_inputs(raw.input_files, params),
    }
