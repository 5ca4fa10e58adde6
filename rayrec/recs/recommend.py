"""``rayrec recommend``: the top-K items of every user (or a list of users) from a trained checkpoint.

The histories a model reads (``as_of``): ``valid`` = the training events (predicting the valid
target), ``test`` = through valid (predicting the test target, what ``rayrec eval`` scores),
``all`` = every event (the production case). Scoring runs in ``Recommender``, a callable class:
on Ray as Ray Data ``map_batches`` on an actor pool (the model loaded once per actor; rows stream
through, so an actor's memory does not grow with the number of users), or with ``local`` in this
process over the same batches. Items are ranked by score, ties by the lower item index; padding
and (unless ``include_seen``) every item of the history are never recommended.

The output folder holds ``recs.parquet`` (raw user id, rank 1..K, raw item id, score) with the
checkpoint, job hash, K and as-of in its metadata, written to a temporary folder and swapped in
whole; a rerun replaces it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from rayrec.console import job_console
from rayrec.data.atomic import check_target, output_lock, replace_folder, temp_folder
from rayrec.errors import ConfigError, DataError
from rayrec.recs.scoring import job_of, popular_top  # job_of: part of this module's interface

log = logging.getLogger(__name__)

AsOf = Literal["valid", "test", "all"]
RECS_FILE = "recs.parquet"
META_KEY = b"rayrec.recs"
BLOCK_BATCHES = 64  # batches of users per Ray Data block
SCORE_BUDGET = 2**24  # scores one batch may hold (64 MiB of float32): the batch shrinks for a large catalogue
SUPPORTED = ("sasrec", "multi_interest", "ur4rec", "popularity")  # and the generative track's adapters


@dataclass(frozen=True)
class Request:
    checkpoint: Path
    k: int
    as_of: AsOf = "test"
    include_seen: bool = False
    users: Path | None = None  # a file of raw user ids (one per line, or a CSV/Parquet column user_id)
    batch_size: int = 256
    histories: Path | None = None  # fresh histories (raw user, item, timestamp; CSV or Parquet)
    job: Path | None = None  # the job of a generative checkpoint that does not keep its own


def resolve_checkpoint(path: Path | str) -> Path:
    """A checkpoint folder (``state.pt``, or an SFT/GRPO adapter), or the chosen checkpoint of a run folder."""
    from rayrec.recs.generative import is_adapter
    from rayrec.runs import local_checkpoint, run_checkpoint
    from rayrec.train.checkpoint import STATE_FILE, latest_checkpoint

    path = local_checkpoint(path)  # an object-store run or checkpoint: a local copy
    if (path / STATE_FILE).is_file() or is_adapter(path):
        return path
    chosen = run_checkpoint(path)
    if chosen is not None and ((Path(chosen) / STATE_FILE).is_file() or is_adapter(Path(chosen))):
        return Path(chosen)
    found = latest_checkpoint(path)
    if found is None:
        raise DataError(f"{path}: neither a checkpoint (no state.pt, no adapter) nor a run folder with checkpoints")
    return found


def user_rows(data_path: str, as_of: AsOf, users: np.ndarray | None = None) -> pd.DataFrame:
    """``user_idx`` and the ``history`` the model reads for each user, as of ``as_of``."""
    split = "valid" if as_of == "valid" else "test"
    t = pd.read_parquet(Path(data_path) / f"{split}.parquet", columns=["user_idx", "history", "target"])
    if as_of == "all":
        t["history"] = [np.append(h, tg) for h, tg in zip(t["history"], t["target"], strict=True)]
    t = t.drop(columns="target")
    if users is not None:
        t = t[t["user_idx"].isin(users)]
    return t.reset_index(drop=True)


@dataclass
class Plan:
    """What scores a request: the scorer class (built once per actor) and its arguments."""

    scorer: type
    kwargs: dict[str, Any]
    ds: Any  # the Prepared dataset the checkpoint was trained on
    meta: dict[str, Any]  # for the output's metadata
    cfg: Any  # the resolved job
    num_gpus: float = 0.0
    batch_format: str = "numpy"  # what the scorer takes from Ray Data ("pyarrow": no Python object per history)


def plan_for(req: Request) -> Plan:
    """Check the checkpoint against its data (before any actor starts) and pick its scorer."""
    from rayrec.data.dataset import check_contents, check_same_data, open_prepared
    from rayrec.recs.generative import GenRecommender, adapter_job, decode_settings, is_adapter
    from rayrec.recs.scoring import Recommender
    from rayrec.storage import home_uri
    from rayrec.train.checkpoint import load_state

    checkpoint = resolve_checkpoint(req.checkpoint).resolve()
    if is_adapter(checkpoint):
        cfg, meta = adapter_job(checkpoint, req.job)
        ds = open_prepared(meta.get("data") or cfg.data.path)
        check_contents(ds)
        _check_k(req.k, ds.num_items)
        settings = decode_settings(cfg, checkpoint, ds, req.k)
        return Plan(GenRecommender, {"adapter": str(checkpoint), "settings": settings}, ds,
                    {"checkpoint": str(checkpoint), "job_hash": _hash(meta.get("config") or str(req.job)),
                     "model": f"genrec ({meta.get('stage', 'sft')})"}, cfg,
                    num_gpus=1.0 if cfg.scaling.use_gpu else 0.0)
    state = load_state(checkpoint)
    cfg = job_of(state)
    if cfg.model.name not in SUPPORTED:
        raise ConfigError(f"rayrec recommend serves {', '.join(SUPPORTED)} checkpoints and SFT/GRPO adapters; "
                          f"{checkpoint} is a {cfg.model.name} model")
    ds = open_prepared(cfg.data.path)  # the data it was trained on: never prepared anew here
    check_contents(ds)
    check_same_data(state.get("data"), cfg.data.path, f"checkpoint {checkpoint}")
    _check_k(req.k, ds.num_items)
    # a copy of an object-store checkpoint: each actor makes its own (on a cluster it may run on another node)
    source = home_uri(checkpoint) or str(checkpoint)
    return Plan(Recommender, {"checkpoint": source, "num_items": ds.num_items}, ds,
                {"checkpoint": str(checkpoint), "job_hash": _hash(state["config"]), "model": cfg.model.name}, cfg,
                num_gpus=1.0 if cfg.scaling.use_gpu else 0.0, batch_format="pyarrow")


def _check_k(k: int, num_items: int) -> None:
    if not 1 <= k < num_items:
        raise ConfigError(f"--k {k}: must be between 1 and {num_items - 1} (the dataset has {num_items} items)")


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_users(path: Path, known: pd.Series) -> tuple[np.ndarray, int]:
    """``user_idx`` of the raw user ids listed in ``path``; returns (indices, how many were unknown)."""
    if not path.is_file():
        raise DataError(f"--users {path}: no such file")
    try:
        if path.suffix == ".parquet":
            raw = pd.read_parquet(path).iloc[:, 0].astype(str)
        else:
            raw = pd.Series([ln.strip().split(",")[0] for ln in path.read_text(encoding="utf-8").splitlines()
                             if ln.strip() and ln.strip() != "user_id"])
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise DataError(f"--users {path}: unreadable ({type(e).__name__}: {e})") from None
    if raw.empty:
        raise DataError(f"--users {path}: no user ids in it")
    idx = raw.map(dict(zip(known.astype(str), known.index, strict=True)))
    unknown = int(idx.isna().sum())
    if unknown:
        log.warning("--users %s: %d of %d user ids are not in the data (e.g. %s); they get no recommendations",
                    path, unknown, len(raw), raw[idx.isna()].iloc[0])
    return idx.dropna().astype(np.int64).to_numpy(), unknown


def request_rows(req: Request, ds) -> tuple[pd.DataFrame, dict[str, int]]:
    """The rows to score: ``key`` (0..n-1), ``user_id`` (raw), ``user_idx`` (0 for a user the data
    does not have) and ``history`` (item_idx lists); and the counts the summary reports."""
    from rayrec.recs.histories import read_histories

    if req.histories is not None:
        if req.users is not None:
            raise ConfigError("give --users or --histories, not both")
        items = ds.table("items")
        frame, counts = read_histories(req.histories, dict(zip(items["source_id"].astype(str), items["item_idx"])))
        frame["user_idx"] = 0
    else:
        known = ds.table("users").set_index("user_idx")["source_id"]
        users, unknown = read_users(req.users, known) if req.users else (None, 0)
        frame = user_rows(str(ds.path), req.as_of, users)
        frame["user_id"] = frame["user_idx"].map(known).astype(str)
        counts = {"unknown_users": unknown}
    frame["key"] = np.arange(len(frame), dtype=np.int64)
    return frame[["key", "user_id", "user_idx", "history"]], counts


def popularity_counts(ds):
    """Training events per item [N+1] (the popularity model's counts)."""
    from rayrec.config.schema import PopularityConfig
    from rayrec.models.popularity import Popularity

    return Popularity(ds.num_items, PopularityConfig()).fit(ds.table("train")["seq"]).counts


def recommend(req: Request, out: Path, *, local: bool = False, actors: int | None = None) -> dict[str, Any]:
    """Write ``out/recs.parquet`` for ``req``; returns its summary (rows, users, unknown users and items)."""
    plan = plan_for(req)
    check_target(out, overwrite=True, marker=RECS_FILE, flag="(a recommend output)")
    rows, counts = request_rows(req, plan.ds)
    empty = rows["history"].map(len).eq(0).to_numpy()
    items = plan.ds.table("items").set_index("item_idx")["source_id"]
    meta = {**plan.meta, "k": req.k, "as_of": "histories" if req.histories else req.as_of,
            "include_seen": req.include_seen, "data_path": str(plan.ds.path.resolve()),
            "users": int(rows["key"].nunique()), "unknown_users": 0, **counts}
    with output_lock(out):  # built in a temporary folder beside ``out``, swapped in whole
        tmp = temp_folder(out)
        try:
            with job_console(tmp, []) as con:  # Ray's and Ray Data's output: tmp/rayrec.log
                kwargs = {**plan.kwargs, "k": req.k, "include_seen": req.include_seen}
                batch = min(req.batch_size, max(1, SCORE_BUDGET // (plan.ds.num_items + 1)))  # [B, N+1] scores
                scored = rows[~empty]
                parts = [pd.DataFrame(popular_top(popularity_counts(plan.ds), rows["key"].to_numpy()[empty], req.k))
                         ] if empty.any() else []
                if len(scored):
                    parts.append(_score_local(scored, plan.scorer, kwargs, batch) if local
                                 else _score_on_ray(scored, plan, kwargs, batch, actors, con.attach_ray))
            _write(rows_table(pd.concat(parts, ignore_index=True), rows["user_id"], items), meta, tmp / RECS_FILE)
            replace_folder(tmp, out, overwrite=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return meta


def _score_local(rows: pd.DataFrame, scorer: type, kwargs: dict[str, Any], batch_size: int) -> pd.DataFrame:
    model = scorer(**kwargs)
    cols = {c: rows[c].to_numpy() for c in ("key", "user_idx", "history")}
    parts = [model({c: v[i : i + batch_size] for c, v in cols.items()}) for i in range(0, len(rows), batch_size)]
    return pd.concat([pd.DataFrame(p) for p in parts], ignore_index=True)


def _score_on_ray(rows: pd.DataFrame, plan: Plan, kwargs: dict[str, Any], batch_size: int, actors: int | None,
                  attach) -> pd.DataFrame:
    import pyarrow as pa
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    from rayrec.cluster import ensure_ray, quiet_ray_data
    from rayrec.data.rows import ragged

    ensure_ray(include_dashboard=False)  # Ray Data needs no state API; the dashboard costs seconds to start
    attach()
    quiet_ray_data()
    cpus = int(ray.cluster_resources().get("CPU", 1))
    size = actors or max(1, cpus - 1)  # one CPU stays free for reading and writing (Ray Data hangs without)
    values, offsets = ragged(rows["history"])
    table = pa.table({"key": rows["key"].to_numpy(), "user_idx": rows["user_idx"].to_numpy(np.int64),
                      "history": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))})  # list<int64>
    # blocks of a few thousand users: the actors share them out and stream them back, so what an actor
    # holds at once (its block's output) does not grow with the number of users
    step = BLOCK_BATCHES * int(batch_size)
    blocks = [table.slice(i, step) for i in range(0, len(table), step)] or [table]
    ds = ray.data.from_arrow(blocks).map_batches(
        plan.scorer, fn_constructor_kwargs=kwargs, batch_size=int(batch_size), batch_format=plan.batch_format,
        compute=ActorPoolStrategy(size=size), num_cpus=1, num_gpus=plan.num_gpus or None,
        # glibc keeps a malloc arena per thread and the peak of each: an actor's memory then grew with the
        # users it scored (1.7 GiB at ML-20M size); two arenas keep it flat
        runtime_env={"env_vars": {"MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "2")}})
    return ds.to_pandas()


def rows_table(recs: pd.DataFrame, user_ids: pd.Series, items: pd.Series):
    """``recs`` (key, rank, item_idx, score) in (key, rank) order as the output's Arrow columns; the raw
    ids are taken from two small string arrays (no Python string per row: 14M rows at ML-20M size)."""
    import pyarrow as pa

    key, rank = recs["key"].to_numpy(), recs["rank"].to_numpy()
    order = np.lexsort((rank, key))
    vocab = np.full(int(items.index.max()) + 1, "", dtype=object)
    vocab[items.index.to_numpy()] = items.astype(str).to_numpy()
    return pa.table({"user_id": pa.array(user_ids.astype(str).to_numpy(), pa.string()).take(pa.array(key[order])),
                     "rank": pa.array(rank[order].astype(np.int64)),
                     "item_id": pa.array(vocab, pa.string()).take(pa.array(recs["item_idx"].to_numpy()[order])),
                     "score": pa.array(recs["score"].to_numpy()[order].astype(np.float64))})


def _write(table, meta: dict[str, Any], path: Path) -> None:
    import pyarrow.parquet as pq

    table = table.replace_schema_metadata({**(table.schema.metadata or {}), META_KEY: json.dumps(meta).encode()})
    pq.write_table(table, path)


def read_recs(folder: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """A written ``recs.parquet`` and its metadata."""
    import pyarrow.parquet as pq

    path = Path(folder) / RECS_FILE
    if not path.is_file():
        raise DataError(f"{folder}: no {RECS_FILE} here (write one with `rayrec recommend ... --out {folder}`)")
    table = pq.read_table(path)
    meta = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
    return table.to_pandas(), meta
