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

log = logging.getLogger(__name__)

AsOf = Literal["valid", "test", "all"]
RECS_FILE = "recs.parquet"
META_KEY = b"rayrec.recs"
SUPPORTED = ("sasrec", "multi_interest", "ur4rec")  # the generative track is not served yet


@dataclass(frozen=True)
class Request:
    checkpoint: Path
    k: int
    as_of: AsOf = "test"
    include_seen: bool = False
    users: Path | None = None  # a file of raw user ids (one per line, or a CSV/Parquet column user_id)
    batch_size: int = 256


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint folder (holds ``state.pt``), or the chosen checkpoint of a run folder."""
    from rayrec.runs import run_checkpoint
    from rayrec.train.checkpoint import STATE_FILE, latest_checkpoint

    path = Path(path).expanduser()
    if (path / STATE_FILE).is_file():
        return path
    chosen = run_checkpoint(path)
    if chosen is not None and (Path(chosen) / STATE_FILE).is_file():
        return Path(chosen)
    found = latest_checkpoint(path)
    if found is None:
        raise DataError(f"{path}: neither a checkpoint (no state.pt) nor a run folder with checkpoints")
    return found


def job_of(state: dict[str, Any]):
    """The resolved job a checkpoint was trained with."""
    import yaml

    from rayrec.config.schema import JobConfig

    return JobConfig.model_validate(yaml.safe_load(state["config"]))


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


class Recommender:
    """Top-K of a batch of users  # {user_idx [B], history [B] lists} -> {user_idx, rank, item_idx, score} [<= B*K]
    (fewer than K rows for a user with fewer than K items left to recommend).

    Built once per Ray Data actor (or once in this process): loads the checkpoint's best weights.
    """

    def __init__(self, checkpoint: str, k: int, include_seen: bool) -> None:
        import torch

        from rayrec.data.dataset import open_prepared
        from rayrec.train.checkpoint import load_state
        from rayrec.train.inputs import data_info
        from rayrec.train.specs import build
        from rayrec.train.state import load_model_weights

        torch.set_num_threads(max(1, int(os.environ.get("RAYREC_RECS_THREADS", "1"))))
        state = load_state(checkpoint)
        self.cfg = job_of(state)
        info = data_info(open_prepared(self.cfg.data.path), self.cfg)
        self.model = build(self.cfg, info)
        weights = state.get("best_model") or state["model"]
        load_model_weights(self.model, weights, f"checkpoint {checkpoint}")
        self.model.eval()
        self.k, self.include_seen, self.num_items = k, include_seen, info.num_items

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from rayrec.data.rows import left_padded, ragged
        from rayrec.train.evaluation import score_rows

        values, offsets = ragged(batch["history"])
        users = np.asarray(batch["user_idx"], dtype=np.int64)
        history = left_padded(values, offsets, self.cfg.model.max_len)
        rows = {"history": torch.from_numpy(history), "user_idx": torch.from_numpy(users)}
        with torch.inference_mode():
            scores = score_rows(self.model, rows).float()  # [B, N+1]
            scores[:, 0] = -torch.inf
            if not self.include_seen:
                seen = torch.from_numpy(left_padded(values, offsets, max(1, int(np.diff(offsets).max(initial=1)))))
                scores.scatter_(1, seen, -torch.inf)  # padding 0s land on column 0, already out
            # highest score first, ties by the lower item index: a stable sort of the negated scores
            order = torch.sort(-scores, dim=1, stable=True).indices[:, : self.k]
            top = scores.gather(1, order)
        b = len(users)
        score = top.reshape(-1).numpy().astype(np.float64)
        keep = np.isfinite(score)  # a user who has seen all but a few items gets only those few
        return {"user_idx": np.repeat(users, self.k)[keep], "rank": np.tile(np.arange(1, self.k + 1), b)[keep],
                "item_idx": order.reshape(-1).numpy()[keep], "score": score[keep]}


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


def recommend(req: Request, out: Path, *, local: bool = False, actors: int | None = None) -> dict[str, Any]:
    """Write ``out/recs.parquet`` for ``req``; returns its summary (rows, users, unknown users)."""
    from rayrec.data.dataset import check_contents, check_same_data, open_prepared
    from rayrec.train.checkpoint import load_state

    checkpoint = resolve_checkpoint(req.checkpoint)
    state = load_state(checkpoint)
    cfg = job_of(state)
    if cfg.model.name not in SUPPORTED:
        raise ConfigError(f"rayrec recommend serves {', '.join(SUPPORTED)} checkpoints so far; {checkpoint} is a "
                          f"{cfg.model.name} model")
    ds = open_prepared(cfg.data.path)  # the data it was trained on: never prepared anew here
    check_contents(ds)
    check_same_data(state.get("data"), cfg.data.path, f"checkpoint {checkpoint}")
    if not 1 <= req.k < ds.num_items:
        raise ConfigError(f"--k {req.k}: must be between 1 and {ds.num_items - 1} (the dataset has {ds.num_items} items)")
    check_target(out, overwrite=True, marker=RECS_FILE, flag="(a recommend output)")
    user_table = ds.table("users")
    known = user_table.set_index("user_idx")["source_id"]
    users, unknown = read_users(req.users, known) if req.users else (None, 0)
    rows = user_rows(str(ds.path), req.as_of, users)
    items = ds.table("items").set_index("item_idx")["source_id"]
    meta = {"checkpoint": str(checkpoint.resolve()), "job_hash": hashlib.sha256(state["config"].encode()).hexdigest()[:16],
            "k": req.k, "as_of": req.as_of, "include_seen": req.include_seen, "data_path": str(ds.path.resolve()),
            "users": int(rows["user_idx"].nunique()), "unknown_users": unknown}
    with output_lock(out):  # built in a temporary folder beside ``out``, swapped in whole
        tmp = temp_folder(out)
        try:
            with job_console(tmp, []) as con:  # Ray's and Ray Data's output: tmp/rayrec.log
                recs = (_score_local(rows, checkpoint, req) if local
                        else _score_on_ray(rows, checkpoint, req, actors, attach=con.attach_ray))
            recs = recs.sort_values(["user_idx", "rank"], kind="stable").reset_index(drop=True)
            frame = pd.DataFrame({"user_id": recs["user_idx"].map(known).astype(str).to_numpy(),
                                  "rank": recs["rank"].to_numpy(),
                                  "item_id": recs["item_idx"].map(items).astype(str).to_numpy(),
                                  "score": recs["score"].to_numpy()})
            _write(frame, meta, tmp / RECS_FILE)
            replace_folder(tmp, out, overwrite=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return meta


def _score_local(rows: pd.DataFrame, checkpoint: Path, req: Request) -> pd.DataFrame:
    model = Recommender(str(checkpoint), req.k, req.include_seen)
    parts = [model({"user_idx": rows["user_idx"].to_numpy()[i : i + req.batch_size],
                    "history": rows["history"].to_numpy()[i : i + req.batch_size]})
             for i in range(0, len(rows), req.batch_size)]
    return pd.concat([pd.DataFrame(p) for p in parts], ignore_index=True)


def _score_on_ray(rows: pd.DataFrame, checkpoint: Path, req: Request, actors: int | None, attach) -> pd.DataFrame:
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    from rayrec.cluster import ensure_ray, quiet_ray_data

    ensure_ray()
    attach()
    quiet_ray_data()
    cpus = int(ray.cluster_resources().get("CPU", 1))
    size = actors or max(1, cpus - 1)  # one CPU stays free for reading and writing (Ray Data hangs without)
    ds = ray.data.from_pandas(rows).map_batches(
        Recommender, fn_constructor_kwargs={"checkpoint": str(checkpoint.resolve()), "k": req.k,
                                            "include_seen": req.include_seen},
        batch_size=req.batch_size, batch_format="numpy", compute=ActorPoolStrategy(size=size), num_cpus=1)
    return ds.to_pandas()


def _write(frame: pd.DataFrame, meta: dict[str, Any], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, preserve_index=False)
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
