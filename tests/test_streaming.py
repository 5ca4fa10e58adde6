"""The Ray Data path yields exactly the plain loader's batches for the same rows and seed."""

import numpy as np
import torch

from rayrec.data.dataset import open_prepared
from rayrec.data.streaming import Collate, PlainLoader, eval_rows, iter_shard, ray_dataset, train_rows


def test_train_rows_shift_and_left_pad():
    out = train_rows({"user_idx": np.array([7]), "seq": np.array([np.array([4, 5, 6, 8])], dtype=object)}, max_len=5)
    assert out["input_ids"].tolist() == [[0, 0, 4, 5, 6]]
    assert out["targets"].tolist() == [[0, 0, 5, 6, 8]]
    cut = train_rows({"user_idx": np.array([7]), "seq": np.array([np.arange(1, 11)], dtype=object)}, max_len=3)
    assert cut["input_ids"].tolist() == [[7, 8, 9]] and cut["targets"].tolist() == [[8, 9, 10]]


def test_eval_rows_keep_full_history_for_masking():
    out = eval_rows({"user_idx": np.array([1]), "history": np.array([np.array([1, 2, 3, 4])], dtype=object),
                     "target": np.array([9])}, max_len=2, seen_len=6)
    assert out["history"].tolist() == [[3, 4]]
    assert out["seen"].tolist() == [[0, 0, 1, 2, 3, 4]]
    assert out["target"].tolist() == [9]


def test_negatives_are_seeded_by_rows_not_call_order():
    batch = {"user_idx": np.array([3, 4]), "targets": np.ones((2, 5), dtype=np.int64)}
    a = Collate(num_items=50, num_negatives=4, seed=1, epoch=2)(batch)["negatives"]
    b = Collate(num_items=50, num_negatives=4, seed=1, epoch=2)(batch)["negatives"]
    c = Collate(num_items=50, num_negatives=4, seed=1, epoch=3)(batch)["negatives"]
    assert a.shape == (2, 5, 4) and torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.min()) >= 1 and int(a.max()) <= 50


def _plain(ds, split, collate, **kw):
    return list(PlainLoader(ds.table(split), split, batch_size=32, collate=collate, **kw))


def test_ray_shard_batches_equal_plain_batches(ray_session, tiny_dataset):
    ds = open_prepared(tiny_dataset)
    collate = Collate(num_items=ds.num_items, num_negatives=2, seed=5, epoch=1)
    ray_train = ray_dataset(str(tiny_dataset), "train", max_len=20)
    ray_batches = list(iter_shard(ray_train.iterator(), batch_size=32, collate=collate))
    plain = _plain(ds, "train", collate, max_len=20)
    assert len(ray_batches) == len(plain) > 3
    for r, p in zip(ray_batches, plain):
        assert r.keys() == p.keys()
        for k in p:
            assert torch.equal(r[k], p[k]), k

    seen_len = ds.max_history("valid")
    ray_valid = ray_dataset(str(tiny_dataset), "valid", max_len=20, seen_len=seen_len)
    rv = list(iter_shard(ray_valid.iterator(), batch_size=32, collate=Collate()))
    pv = _plain(ds, "valid", Collate(), max_len=20, seen_len=seen_len)
    assert all(torch.equal(r[k], p[k]) for r, p in zip(rv, pv) for k in p)


def test_shuffled_epoch_covers_every_row_once(ray_session, tiny_dataset):
    ds = open_prepared(tiny_dataset)
    collate = Collate(seed=3, epoch=1)
    ray_train = ray_dataset(str(tiny_dataset), "train", max_len=20)
    ray_users = torch.cat([b["user_idx"] for b in iter_shard(ray_train.iterator(), batch_size=32, collate=collate, shuffle_buffer=64)])
    plain_users = torch.cat([b["user_idx"] for b in _plain(ds, "train", collate, max_len=20, shuffle=True)])
    expected = sorted(ds.table("train")["user_idx"].tolist())
    assert sorted(ray_users.tolist()) == expected == sorted(plain_users.tolist())
    assert plain_users.tolist() != expected  # it did shuffle
