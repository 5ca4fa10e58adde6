"""``rayrec eval-recs``: HR@k, NDCG@k and MRR@K of a written top-K file against a prepared split.

A user's target ranks where it stands in the user's list; a target not in the list counts as a
miss (rank > K). So HR@k and NDCG@k for k <= K equal what ``rayrec eval`` reports for the same
checkpoint and histories (which ranks against every item), as long as no two items tie on the
target's score; MRR is the truncated MRR@K (a full-ranking MRR needs every item's rank).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from rayrec.errors import ConfigError
from rayrec.eval.metrics import MetricSums
from rayrec.recs.recommend import read_recs


def eval_recs(folder: Path, split: str, ks: tuple[int, ...] = (5, 10, 20)) -> dict[str, float]:
    recs, meta = read_recs(folder)
    k_max = int(meta.get("k", recs["rank"].max()))
    if meta.get("as_of") != split:  # as of valid predicts the valid target, as of test the test target
        raise ConfigError(f"{folder}: these recommendations read histories as of '{meta.get('as_of')}', so they "
                          f"do not predict the {split} split (write them with --as-of {split})")
    data = Path(meta["data_path"])
    users = pd.read_parquet(data / "users.parquet", columns=["user_idx", "source_id"])
    items = pd.read_parquet(data / "items.parquet", columns=["item_idx", "source_id"])
    truth = pd.read_parquet(data / f"{split}.parquet", columns=["user_idx", "target"])
    truth["user_id"] = truth["user_idx"].map(users.set_index("user_idx")["source_id"]).astype(str)
    truth["item_id"] = truth["target"].map(items.set_index("item_idx")["source_id"]).astype(str)
    truth = truth[truth["user_id"].isin(set(recs["user_id"]))]
    hits = recs.merge(truth[["user_id", "item_id"]], on=["user_id", "item_id"], how="inner")
    rank = truth[["user_id"]].merge(hits[["user_id", "rank"]], on="user_id", how="left")["rank"]
    ranks = torch.tensor(rank.fillna(k_max + 1).to_numpy(dtype=np.float64))
    use = tuple(k for k in ks if k <= k_max) or (k_max,)
    sums = MetricSums(use).update(ranks)
    out = sums.means(f"{split}/")
    out = {k: v for k, v in out.items() if "@" in k}  # mrr and mean rank need every item's rank
    out[f"{split}/mrr@{k_max}"] = float(torch.where(ranks <= k_max, 1.0 / ranks, 0.0).mean()) if len(ranks) else 0.0
    out[f"{split}/rows"] = float(len(ranks))
    return out
