"""The data paths: training windows, evaluation rows, and the same batches from memory and from Ray Data."""

import numpy as np
import pytest
import torch

from rayrec.data import rows as R
from rayrec.data.dataset import open_prepared
from rayrec.data.streaming import Collate, TableLoader, eval_rows, iter_shard, ray_dataset, train_rows


def _seqs(*seqs):
    return {"user_idx": np.arange(len(seqs)), "seq": np.array([np.asarray(s) for s in seqs] + [None], dtype=object)[:-1]}


def test_train_rows_shift_and_left_pad():
    out = train_rows({"user_idx": np.array([7]), "seq": np.array([np.array([4, 5, 6, 8])], dtype=object)}, max_len=5)
    assert out["input_ids"].tolist() == [[0, 0, 4, 5, 6]]
    assert out["targets"].tolist() == [[0, 0, 5, 6, 8]]
    cut = train_rows({"user_idx": np.array([7]), "seq": np.array([np.arange(1, 11)], dtype=object)}, max_len=3)
    assert cut["input_ids"].tolist() == [[7, 8, 9]] and cut["targets"].tolist() == [[8, 9, 10]]


def test_sliding_windows_make_every_training_event_a_target_once():
    out = train_rows(_seqs(np.arange(1, 11), [4, 5]), max_len=4, windows="sliding")
    # user 0: 9 positions -> windows ending at 9, 5, 1 (oldest first); user 1: one window
    assert out["user_idx"].tolist() == [0, 0, 0, 1]
    assert out["input_ids"].tolist() == [[0, 0, 0, 1], [2, 3, 4, 5], [6, 7, 8, 9], [0, 0, 0, 4]]
    assert out["targets"].tolist() == [[0, 0, 0, 2], [3, 4, 5, 6], [7, 8, 9, 10], [0, 0, 0, 5]]
    assert out["window_end"].tolist() == [1, 5, 9, 1]
    targets = out["targets"][:3][out["targets"][:3] > 0]
    assert sorted(targets.tolist()) == list(range(2, 11))  # each of items 2..10 exactly once
    last = train_rows(_seqs(np.arange(1, 11), [4, 5]), max_len=4, windows="last")
    assert last["input_ids"].tolist() == [[6, 7, 8, 9], [0, 0, 0, 4]]
    assert R.count_windows(np.array([10, 2]), 4, "sliding", 4) == 4


def test_overlapping_windows_with_a_stride():
    out = train_rows(_seqs(np.arange(1, 9)), max_len=4, windows="sliding", stride=2)
    # 7 positions: windows end at 7, 5, 3; the oldest one is left-padded
    assert out["input_ids"].tolist() == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7]]
    assert set(out["targets"][out["targets"] > 0].tolist()) == set(range(2, 9))


def test_eval_rows_keep_full_history_for_masking():
    out = eval_rows({"user_idx": np.array([1]), "history": np.array([np.array([1, 2, 3, 4])], dtype=object),
                     "target": np.array([9])}, max_len=2, seen_len=6)
    assert out["history"].tolist() == [[3, 4]]
    assert out["seen"].tolist() == [[0, 0, 1, 2, 3, 4]]
    assert out["target"].tolist() == [9]


def test_negatives_are_seeded_by_rows_not_call_order():
    batch = {"user_idx": np.array([3, 4]), "window_end": np.array([9, 9]), "targets": np.ones((2, 5), dtype=np.int64)}
    a = Collate(num_items=50, num_negatives=4, seed=1, epoch=2)(batch)["negatives"]
    b = Collate(num_items=50, num_negatives=4, seed=1, epoch=2)(batch)["negatives"]
    c = Collate(num_items=50, num_negatives=4, seed=1, epoch=3)(batch)["negatives"]
    d = Collate(num_items=50, num_negatives=4, seed=1, epoch=2)({**batch, "window_end": np.array([5, 9])})["negatives"]
    assert a.shape == (2, 5, 4) and torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, d)  # another window of the same user draws other negatives
    assert int(a.min()) >= 1 and int(a.max()) <= 50


def test_epoch_order_permutes_chunks_and_is_seeded():
    a = R.epoch_order(100, seed=1, epoch=2, buffer=32)
    assert sorted(a.tolist()) == list(range(100)) and a.tolist() != list(range(100))
    assert all(set(a[lo:lo + 32].tolist()) == set(range(lo, min(lo + 32, 100))) for lo in range(0, 100, 32))
    assert np.array_equal(a, R.epoch_order(100, seed=1, epoch=2, buffer=32))
    assert not np.array_equal(a, R.epoch_order(100, seed=1, epoch=3, buffer=32))
    assert R.epoch_order(5, seed=1, epoch=1, buffer=0).tolist() == [0, 1, 2, 3, 4]


def test_worker_shares_cover_every_row():
    order = np.arange(11)
    shares = [R.rank_share(order, r, 3) for r in range(3)]
    assert {len(s) for s in shares} == {4}  # equal steps on every rank
    assert set(np.concatenate(shares).tolist()) == set(range(11))
    ev = [R.eval_share(11, r, 3) for r in range(3)]
    assert sorted(np.concatenate(ev).tolist()) == list(range(11))  # every evaluation row exactly once


def _memory(ds, split, collate, *, max_len=20, windows="last", shuffle_buffer=0, seen_len=0):
    if split == "train":
        table = R.train_table(str(ds.path), max_len=max_len, windows=windows, stride=None)
    else:
        table = R.split_table(str(ds.path), split, max_len=max_len, seen_len=seen_len)
    return list(TableLoader(table, batch_size=32, collate=collate, shuffle_buffer=shuffle_buffer))


def _assert_same(a, b):
    assert len(a) == len(b) > 3
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in y:
            assert torch.equal(x[k], y[k]), k


@pytest.mark.parametrize("windows", ["last", "sliding"])
def test_streamed_batches_equal_in_memory_batches_for_the_same_seed(ray_session, tiny_dataset, windows):
    ds = open_prepared(tiny_dataset)
    collate = Collate(num_items=ds.num_items, num_negatives=2, seed=5, epoch=1)
    stream = ray_dataset(str(tiny_dataset), "train", max_len=8, windows=windows, override_num_blocks=3)
    streamed = list(iter_shard(stream.iterator(), batch_size=32, collate=collate, shuffle_buffer=48))
    memory = _memory(ds, "train", collate, max_len=8, windows=windows, shuffle_buffer=48)
    _assert_same(streamed, memory)
    users = torch.cat([b["user_idx"] for b in memory])
    assert users.tolist() != sorted(users.tolist())  # it did shuffle

    seen_len = ds.max_history("valid")
    ray_valid = ray_dataset(str(tiny_dataset), "valid", max_len=20, seen_len=seen_len)
    _assert_same(list(iter_shard(ray_valid.iterator(), batch_size=32, collate=Collate())),
                 _memory(ds, "valid", Collate(), seen_len=seen_len))


def test_sliding_windows_train_on_every_event(tiny_dataset):
    ds = open_prepared(tiny_dataset)
    batches = _memory(ds, "train", Collate(seed=3, epoch=1), max_len=8, windows="sliding", shuffle_buffer=64)
    targets = torch.cat([b["targets"][b["targets"] > 0] for b in batches])
    seqs = ds.table("train")["seq"]
    assert len(targets) == sum(len(s) - 1 for s in seqs)  # every next-item event, once
    last = _memory(ds, "train", Collate(), max_len=8)
    assert sum(int((b["targets"] > 0).sum()) for b in last) < len(targets)


def test_ingest_auto_picks_memory_when_the_tables_fit_and_streams_otherwise(ray_session, tiny_job):
    from rayrec.recipes.sequential import choose_ingest
    from rayrec.train.inputs import data_info

    info = data_info(open_prepared(tiny_job.data.path), tiny_job)
    assert choose_ingest(tiny_job, info) == "memory"
    tiny = tiny_job.model_copy(deep=True)
    tiny.data.memory_fraction = 1e-9  # the object store "cannot hold" 600 KB
    assert choose_ingest(tiny, info) == "stream"
    tiny.data.ingest = "memory"
    assert choose_ingest(tiny, info) == "memory"  # the config's choice wins


def test_a_sweeps_trials_reuse_the_row_tables_its_driver_made(ray_session, tiny_job, tmp_path, monkeypatch):
    import ray

    from rayrec.recipes import sequential
    from rayrec.runs import Run

    shared = sequential.share(tiny_job)  # on the sweep driver, once
    assert shared.tables and len(ray.get(shared.tables["train"])) == shared.info.train_rows

    def built_again(*a, **k):
        raise AssertionError("a trial rebuilt what the sweep's driver made")

    monkeypatch.setattr(sequential, "put_tables", built_again)
    monkeypatch.setattr(sequential, "data_info", built_again)
    run = Run(tmp_path, local=False, shared=shared)
    inputs = sequential.prepare(tiny_job, run)
    parts = sequential.trainer_parts(tiny_job, inputs, run)
    assert parts.config["tables"] is shared.tables and not parts.datasets

    other = tiny_job.model_copy(deep=True)
    other.model.max_len = 10  # other rows: this trial makes its own
    with pytest.raises(AssertionError, match="rebuilt"):
        sequential.prepare(other, run)


def test_a_worker_reads_the_row_tables_in_place_not_as_a_copy(ray_session, tiny_job):
    """Numpy arrays from the object store are read-only views of its shared memory: a worker holds
    no copy of the tables, and no Python object per row."""
    import ray

    from rayrec.train.inputs import data_info, row_tables

    tables = row_tables(tiny_job, data_info(open_prepared(tiny_job.data.path), tiny_job))
    ref = ray.put(tables["train"])

    @ray.remote(num_cpus=0)
    def inspect(table):
        arrays = list(table.dense.values())
        return [a.dtype != object and not a.flags.writeable and not a.flags.owndata for a in arrays], len(table)

    in_place, rows = ray.get(inspect.remote(ref))
    assert rows == len(tables["train"]) and in_place and all(in_place)


def test_a_window_stride_beyond_max_len_is_refused_naming_both():
    from rayrec.config.schema import JobConfig

    with pytest.raises(ValueError, match=r"window_stride \(60\) > model.max_len \(50\)"):
        JobConfig.model_validate({"model": {"name": "sasrec", "max_len": 50}, "train": {"window_stride": 60}})
    assert JobConfig.model_validate({"train": {"window_stride": 25}}).train.windows == "sliding"
