"""An exported model's folder: all a service needs to recommend, without the run, its data or Ray.

    bundle.json      kind (scores | beams), num_items, the source checkpoint, job hash, model
    model/           scores: state.pt (best weights + the job); beams: the adapter (tokenizer, SID
                     index, genrec.json naming the base model by path, never copied)
    items.parquet    item_idx, source_id: the item vocabulary
    users.parquet    user_id, user_idx, history: every event of each training user (as of all)
    popularity.npy   training events per item [N+1]
    data/            scores: manifest.json and, for the joint model, its frozen features
    settings.json    beams: what decoding needs (item SIDs, titles, the prompt budget)
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rayrec.errors import DataError

#: Adapter files a service does not need (optimizer and trainer state).
TRAINING_ONLY = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin", "trainer_state.json")


def write_bundle(plan, out: Path) -> dict[str, Any]:
    """Write the bundle of ``plan`` (``rayrec.recs.recommend.plan_for``) into the new folder ``out``."""
    import torch
    import yaml

    from rayrec.data.features import feature_dir
    from rayrec.recs.recommend import popularity_counts, user_rows
    from rayrec.recs.scoring import job_of
    from rayrec.train.checkpoint import STATE_FILE, load_state
    from rayrec.train.specs import spec_of

    ds, src = plan.ds, Path(plan.meta["checkpoint"])
    out.mkdir(parents=True)
    (out / "model").mkdir()
    if "adapter" in plan.kwargs:
        kind = "beams"
        for f in src.iterdir():
            if f.is_file() and f.name not in TRAINING_ONLY:
                shutil.copy2(f, out / "model" / f.name)
        (out / "settings.json").write_text(json.dumps({**plan.kwargs["settings"], "use_gpu": False}))
    else:
        kind = "scores"
        state = load_state(src)
        job = yaml.safe_load(state["config"])
        reads_features = spec_of(job["model"]["name"]).build_from_data is not None  # the joint model
        if reads_features:
            features = feature_dir(job_of(state).model.features, ds.path)
            job["model"]["features"]["dir"] = None  # read from data/features of the bundle
        torch.save({"config": yaml.safe_dump(job, sort_keys=False), "model": state.get("best_model") or state["model"]},
                   out / "model" / STATE_FILE)
        (out / "data").mkdir()
        shutil.copy2(ds.path / "manifest.json", out / "data" / "manifest.json")
        if reads_features:
            shutil.copytree(features, out / "data" / "features")
    items = ds.table("items")[["item_idx", "source_id"]].assign(source_id=lambda t: t["source_id"].astype(str))
    items.to_parquet(out / "items.parquet", index=False)
    users = user_rows(str(ds.path), "all")
    names = ds.table("users").set_index("user_idx")["source_id"].astype(str)
    users.insert(0, "user_id", users["user_idx"].map(names))
    users.to_parquet(out / "users.parquet", index=False)
    np.save(out / "popularity.npy", popularity_counts(ds).numpy())
    info = {"kind": kind, "num_items": ds.num_items, "checkpoint": str(src), "job_hash": plan.meta["job_hash"],
            "model": plan.meta["model"]}
    (out / "bundle.json").write_text(json.dumps(info, indent=2))
    return info


@dataclass
class Bundle:
    folder: Path
    info: dict[str, Any]
    items: pd.Series  # item_idx -> raw item id
    item_index: dict[str, int]  # raw item id -> item_idx
    users: pd.DataFrame  # indexed by user_id: user_idx, history
    popularity: Any  # torch [N+1]
    scorer: Any

    def recommend(self, frame: pd.DataFrame, k: int, include_seen: bool) -> pd.DataFrame:
        """``rayrec.recs.served``'s rows for the request ``frame``."""
        from rayrec.recs.histories import map_histories
        from rayrec.recs.scoring import popular_top

        if not {"user_id", "history"} & set(frame.columns):
            raise DataError(f"the request has columns {list(frame.columns)}; it needs user_id and/or history")
        if not 1 <= k < self.info["num_items"]:
            raise DataError(f"k={k}: must be between 1 and {self.info['num_items'] - 1}")
        n = len(frame)
        ids = [_text(v) for v in frame["user_id"]] if "user_id" in frame else [None] * n
        given = [_items(v) for v in frame["history"]] if "history" in frame else [[]] * n
        keys = np.arange(n, dtype=np.int64)
        events = pd.Series([str(i) for i, h in zip(keys, given) for _ in h], dtype=object)
        mapped, _ = map_histories(events, pd.Series([x for h in given for x in h], dtype=object), self.item_index,
                                  source="the request")
        by_key = dict(zip(mapped["user_id"], mapped["history"]))
        names, user_idx, histories = [], np.zeros(n, dtype=np.int64), []
        for i in range(n):
            uid = ids[i]
            names.append(uid if uid is not None else f"row {i}")
            known = uid is not None and uid in self.users.index
            user_idx[i] = int(self.users.at[uid, "user_idx"]) if known else 0
            if given[i]:
                histories.append(np.asarray(by_key.get(str(i), np.zeros(0)), dtype=np.int64))
            else:
                histories.append(np.asarray(self.users.at[uid, "history"], dtype=np.int64) if known
                                 else np.zeros(0, dtype=np.int64))
        has = np.array([len(h) > 0 for h in histories], dtype=bool)
        parts = []
        if (~has).any():
            parts.append(pd.DataFrame(popular_top(self.popularity, keys[~has], k)))
        if has.any():
            batch = {"key": keys[has], "user_idx": user_idx[has],
                     "history": np.array([histories[i] for i in np.flatnonzero(has)] + [None], dtype=object)[:-1]}
            parts.append(pd.DataFrame(self.scorer(batch, k=k, include_seen=include_seen)))
        recs = pd.concat(parts, ignore_index=True).sort_values(["key", "rank"], kind="stable")
        return pd.DataFrame({"user_id": np.asarray(names, dtype=object)[recs["key"].to_numpy()],
                             "rank": recs["rank"].to_numpy(dtype=np.int64),
                             "item_id": recs["item_idx"].map(self.items).astype(str).to_numpy(),
                             "score": recs["score"].to_numpy(dtype=np.float64)})


def open_bundle(folder: Path) -> Bundle:
    import torch

    folder = Path(folder)
    info = json.loads((folder / "bundle.json").read_text())
    items = pd.read_parquet(folder / "items.parquet")
    users = pd.read_parquet(folder / "users.parquet").set_index("user_id")
    if info["kind"] == "beams":
        from rayrec.recs.generative import GenRecommender

        scorer = GenRecommender(str(folder / "model"), 10, False, json.loads((folder / "settings.json").read_text()))
    else:
        from rayrec.recs.scoring import Recommender

        scorer = Recommender(str(folder / "model"), 10, False, data_path=str(folder / "data"),
                             num_items=info["num_items"])
    return Bundle(folder, info, items.set_index("item_idx")["source_id"],
                  dict(zip(items["source_id"], items["item_idx"])), users,
                  torch.from_numpy(np.load(folder / "popularity.npy")), scorer)


def _text(value) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return str(value)


def _items(value) -> list[str]:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    return [str(v) for v in value]
