"""Semantic IDs: RQ quantisers, collision resolution, MiniOneRec index files, bad indexes."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from rayrec.config.genrec import SidConfig
from rayrec.errors import ConfigError, DataError
from rayrec.genrec import semantic_ids as S

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def clusters(n_per: int = 40, centers: int = 6, dim: int = 16, seed: int = 0, spread: float = 0.1) -> np.ndarray:
    """Well separated Gaussian blobs  # [n_per * centers, dim]."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(centers, dim))
    return np.concatenate([m + rng.normal(scale=spread, size=(n_per, dim)) for m in mu]).astype(np.float32)


def items_table(n: int) -> pd.DataFrame:
    return pd.DataFrame({"item_idx": np.arange(1, n + 1, dtype=np.int32), "source_id": [f"i{k}" for k in range(n)],
                         "title": [f"Item {k}" for k in range(n)], "text": [""] * n})


def test_rq_kmeans_first_level_finds_the_clusters_and_uses_every_code():
    x = clusters()
    q = S.rq_kmeans(x, levels=3, k=6, iters=30, seed=0)
    assert q.codes.shape == (240, 3) and q.codes.max() < 6
    first = q.codes[:, 0].numpy().reshape(6, 40)
    assert all(len(set(row)) == 1 for row in first)  # each blob gets one first-level code
    assert len({row[0] for row in first}) == 6
    assert S.codebook_usage(q.codes, 6) == [1.0, 1.0, 1.0]
    assert q.info["residual_mse"] < float(np.var(x, 0).sum())  # quantisation explains variance


def test_balanced_kmeans_spreads_items_evenly():
    x = np.random.default_rng(1).normal(size=(200, 8)).astype(np.float32)
    x[:150] *= 0.05  # a dense core that plain k-means would give few codes
    q = S.rq_kmeans(x, levels=1, k=4, balanced=True, seed=0)
    counts = np.bincount(q.codes[:, 0].numpy(), minlength=4)
    assert counts.min() >= 35 and counts.max() <= 65


def test_hand_computed_usage_and_collision_rate():
    codes = np.array([[0, 1], [0, 1], [1, 2], [1, 3]])
    assert S.collision_rate(codes) == 0.5  # two of four items share (0, 1)
    assert S.codebook_usage(codes, 4) == [0.5, 0.75]


def forced(codes, k=4, dim=2) -> S.Quantized:
    codes = torch.tensor(codes)
    g = torch.Generator().manual_seed(0)
    return S.Quantized(codes, torch.randn(len(codes), dim, generator=g), torch.randn(k, dim, generator=g), {})


def test_collisions_are_reassigned_at_the_last_level():
    q = forced([[0, 1], [0, 1], [0, 1], [1, 2]])
    codes, stats = S.resolve_collisions(q)
    assert stats["collision_rate_raw"] == 0.75 and stats["collision_rate"] == 0.0 and not stats["extra_level"]
    assert codes.shape == (4, 2) and codes[:, 0].tolist() == [0, 0, 0, 1]  # prefixes kept
    assert len({tuple(r) for r in codes.tolist()}) == 4
    # the assignment is the optimal one: its total cost is not above that of any permutation of free codes
    cost = torch.cdist(q.last_residual[:3], q.last_codebook).pow(2)
    chosen = cost[torch.arange(3), codes[:3, 1]].sum()
    assert chosen <= min(cost[0, a] + cost[1, b] + cost[2, c] for a in range(4) for b in range(4) for c in range(4)
                         if len({a, b, c}) == 3) + 1e-6


def test_groups_larger_than_the_codebook_get_an_extra_level():
    q = forced([[0, 1]] * 5 + [[1, 0]], k=4)
    codes, stats = S.resolve_collisions(q)
    assert stats["extra_level"] and stats["collision_rate"] == 0.0 and codes.shape == (6, 3)
    assert sorted(codes[:5, 2].tolist()) == [0, 1, 2, 3, 4] and codes[5, 2] == 0


def test_rq_vae_learns_the_clusters_and_keeps_codes_alive():
    x = clusters(n_per=20, centers=4, dim=12, spread=0.02)
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # like sentence embeddings
    kw = dict(levels=2, k=4, hidden=[16], latent=4, batch_size=40, lr=3e-3, beta=0.25, seed=0)
    short, q = S.rq_vae(x, epochs=1, **kw), S.rq_vae(x, epochs=40, **kw)
    assert q.codes.shape == (80, 2) and q.info["recon_mse"] < 0.5 * short.info["recon_mse"]
    first = q.codes[:, 0].numpy().reshape(4, 20)
    assert all(len(set(row)) == 1 for row in first) and len({row[0] for row in first}) == 4
    assert S.codebook_usage(q.codes, 4) == [1.0, 1.0]  # dead codes are restarted
    codes, stats = S.resolve_collisions(q)
    assert stats["collision_rate"] == 0.0 and len({tuple(r) for r in codes.tolist()}) == 80


def test_build_index_round_trips_through_minionerec_files(tmp_path):
    items = items_table(60)
    cfg = SidConfig(levels=2, codebook_size=4, dir=tmp_path, name="Toys")
    index, report = S.build_index(items, cfg, embeddings=clusters(n_per=10, centers=6, dim=8))
    assert report["collision_rate"] == 0.0 and len(report["usage"]) == 2
    path = S.write_index(index, tmp_path, "Toys", dict(zip(items["source_id"], items["title"])))
    assert path == tmp_path / "index" / "Toys.index.json"
    back = S.read_index(tmp_path, "Toys")
    assert back.tokens == index.tokens
    info = S.read_info(tmp_path / "info" / "Toys.txt")
    assert info["i3"] == ("".join(index.tokens["i3"]), "Item 3")
    mapping = back.for_items(items)
    assert mapping[4] == index.tokens["i3"]  # item_idx 4 is source id i3
    assert back.vocab()[0] == "<a_0>" and all(t.startswith(("<a_", "<b_", "<c_")) for t in back.vocab())


def test_reads_minionerec_own_index(tmp_path):
    """MiniOneRec's files: numeric item ids, three levels, codes up to 255."""
    (tmp_path / "index").mkdir()
    raw = {"0": ["<a_12>", "<b_7>", "<c_200>"], "1": ["<a_12>", "<b_7>", "<c_3>"], "2": ["<a_255>", "<b_0>", "<c_0>"]}
    (tmp_path / "index" / "Industrial_and_Scientific.index.json").write_text(json.dumps(raw))
    index = S.read_index(tmp_path)  # the only index of the folder
    items = pd.DataFrame({"item_idx": [1, 2, 3], "source_id": ["0", "1", "2"], "title": ["a", "b", "c"], "text": ""})
    assert index.for_items(items) == {1: ("<a_12>", "<b_7>", "<c_200>"), 2: ("<a_12>", "<b_7>", "<c_3>"),
                                      3: ("<a_255>", "<b_0>", "<c_0>")}
    assert index.vocab()[:2] == ["<a_12>", "<a_255>"]  # numeric order within a level
    assert S.describe_index(index)["distinct_codes"] == [2, 2, 3]


def test_bad_indexes_fail_with_clear_messages(tmp_path):
    items = items_table(3)
    good = {"i0": ("<a_1>", "<b_1>"), "i1": ("<a_1>", "<b_2>"), "i2": ("<a_2>", "<b_1>")}
    with pytest.raises(DataError, match="not in the dataset.*e.g. ghost"):
        S.SidIndex({**good, "ghost": ("<a_9>", "<b_9>")}, "x.index.json").for_items(items)
    with pytest.raises(DataError, match="have no SID, e.g. i2"):
        S.SidIndex({k: v for k, v in good.items() if k != "i2"}).for_items(items)
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "bad.index.json").write_text(json.dumps({"i0": ["a_1", "<b_1>"]}))
    with pytest.raises(DataError, match="bad.index.json: item 'i0'"):
        S.read_index(tmp_path, "bad")
    with pytest.raises(ConfigError, match="no missing.index.json"):
        S.read_index(tmp_path, "missing")


def test_minilm_embeds_offline():
    emb = S.embed_texts(["Noir detective in the rain", "A smoky harbor alley", "Space station drift"], "minilm")
    assert emb.shape == (3, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    assert emb[0] @ emb[1] > emb[0] @ emb[2]  # noir texts are closer to each other than to space
    with pytest.raises(ConfigError, match="nothing is downloaded"):
        S.resolve_embedder("sentence-transformers/all-MiniLM-L6-v2")


def minionerec_folder(root, name: str = "Toys"):
    """A tiny MiniOneRec data folder: CSV splits, index/NAME.index.json, index/NAME.item.json."""
    import csv

    titles = {"1": "Red Car", "2": "Blue Kite", "3": "Lego Set", "4": "Puzzle", "5": "Yo-yo"}
    splits = {"train": [("A1", ["1"], "2"), ("A1", ["1", "2"], "3"), ("A2", ["3"], "1"), ("A2", ["3", "1"], "5")],
              "valid": [("A1", ["1", "2", "3"], "4")], "test": [("A2", ["3", "1", "5"], "2")]}
    for split, rows in splits.items():
        (root / split).mkdir(parents=True)
        with (root / split / f"{name}_5_2016-10-2018-11.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["user_id", "history_item_id", "item_id"])
            w.writerows([(u, repr([int(i) for i in h]), t) for u, h, t in rows])
    (root / "index").mkdir()
    index = {i: [f"<a_{i}>", "<b_0>", f"<c_{int(i) * 7}>"] for i in titles}
    (root / "index" / f"{name}.index.json").write_text(json.dumps(index))
    (root / "index" / f"{name}.item.json").write_text(json.dumps({i: {"title": t} for i, t in titles.items()}))
    return root, index


@pytest.mark.parametrize("method", ["file", "data"])
def test_minionerec_dataset_with_its_own_index_feeds_the_prompts(tmp_path, method):
    from rayrec.config.genrec import GenRecJobConfig
    from rayrec.genrec.inputs import prepare_inputs

    raw, index = minionerec_folder(tmp_path / "raw")
    cfg = GenRecJobConfig.model_validate({
        "data": {"path": str(tmp_path / "prepared"), "source": "minionerec", "input": str(raw),
                 "source_options": {"name": "Toys"}, "filters": {"min_seq_len": 1}},
        "sids": {"method": method, "dir": str(raw), "name": "Toys"},
        "prompts": {"tasks": {"sid_seq": 1.0, "title_to_sid": 1.0}},
    })
    inputs = prepare_inputs(cfg)
    items = inputs.ds.table("items")
    by_source = dict(zip(items["source_id"].astype(str), items["item_idx"].astype(int)))
    assert {by_source[k]: tuple(v) for k, v in index.items()} == inputs.item_sids
    lego = inputs.train[(inputs.train["task"] == "title_to_sid") & inputs.train["prompt"].str.contains("Lego Set")]
    assert lego["completion"].tolist() == ["<a_3><b_0><c_21>"]
    assert inputs.valid["completion"].tolist() == ["<a_4><b_0><c_28>"]
