"""Preparation: filters to a fixed point, split protocols, the data contract, atomic writes."""

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from rayrec.config.schema import FilterConfig
from rayrec.data.dataset import describe, open_prepared
from rayrec.data.prepare import apply_filters, prepare
from rayrec.data.sources.base import RawData
from rayrec.errors import DataError


def events(rows):
    return pd.DataFrame(rows, columns=["user", "item", "timestamp", "rating"]).astype(
        {"user": str, "item": str, "timestamp": "int64", "rating": "float64"})


def raw_of(df, items=None):
    return lambda workdir: RawData(interactions=df, items=items)


def ladder(users=4, length=5):
    """User u sees items u..u+length-1 at times 0..length-1 (ratings 1..5 cycling)."""
    return events([(u, u + t, t, 1 + (t % 5)) for u in range(1, users + 1) for t in range(length)])


def test_k_core_iterates_to_fixed_point():
    # item 9 is seen once; dropping it leaves user 3 with 2 events -> user 3 goes,
    # then item 7 (seen by users 1 and 3) falls to 1 event -> goes, then user 1 has 2 -> goes ...
    df = events([(1, 5, 0, 5), (1, 6, 1, 5), (1, 7, 2, 5),
                 (2, 5, 0, 5), (2, 6, 1, 5), (2, 8, 2, 5),
                 (3, 7, 0, 5), (3, 9, 1, 5), (3, 8, 2, 5),
                 (4, 5, 0, 5), (4, 6, 1, 5), (4, 8, 2, 5)])
    out, removed = apply_filters(df, FilterConfig(user_core=3, item_core=2, min_seq_len=1))
    users = out.groupby("user").size()
    items = out.groupby("item").size()
    assert (users >= 3).all() and (items >= 2).all()  # a fixed point
    assert set(out["user"]) == {"2", "4"} and set(out["item"]) == {"5", "6", "8"}
    assert removed["core_and_min_len"] == 6


def test_rating_filter_and_empty_result_names_filter():
    df = ladder()
    out, removed = apply_filters(df, FilterConfig(min_rating=4, min_seq_len=1))
    assert (out["rating"] >= 4).all() and removed["min_rating"] == len(df) - len(out)
    with pytest.raises(DataError, match="min_rating=9"):
        apply_filters(df, FilterConfig(min_rating=9))
    with pytest.raises(DataError, match="user_core=50"):
        apply_filters(df, FilterConfig(user_core=50))


def test_leave_one_out_contract(tmp_path):
    m = prepare(raw_of(ladder()), tmp_path / "d", source="t", params={}, filters=FilterConfig(), split="leave_one_out")
    d = tmp_path / "d"
    train, valid, test = (pd.read_parquet(d / f"{s}.parquet") for s in ("train", "valid", "test"))
    items = pd.read_parquet(d / "items.parquet")
    # ids are mapped to 1..N in natural numeric order, 0 is padding
    assert items["item_idx"].tolist() == list(range(1, 9)) and items["source_id"].tolist() == [str(i) for i in range(1, 9)]
    u1 = train[train["user_idx"] == 1]["seq"].iloc[0].tolist()
    assert u1 == [1, 2, 3]
    assert valid.iloc[0]["history"].tolist() == [1, 2, 3] and valid.iloc[0]["target"] == 4
    assert test.iloc[0]["history"].tolist() == [1, 2, 3, 4] and test.iloc[0]["target"] == 5
    assert pq.read_schema(d / "train.parquet").field("seq").type.value_type == "int32"
    assert m["counts"] == {"users": 4, "items": 8, "interactions": 20, "train_users": 4, "valid_rows": 4, "test_rows": 4}
    assert json.loads((d / "manifest.json").read_text())["input_hash"] == m["input_hash"]


def test_chronological_order_not_file_order(tmp_path):
    df = events([(1, 3, 30, 5), (1, 1, 10, 5), (1, 2, 20, 5), (1, 4, 40, 5)])
    prepare(raw_of(df), tmp_path / "d", source="t", params={}, filters=FilterConfig(), split="leave_one_out")
    test = pd.read_parquet(tmp_path / "d" / "test.parquet")
    assert test.iloc[0]["history"].tolist() == [1, 2, 3] and test.iloc[0]["target"] == 4


def test_temporal_split_uses_global_time_cut(tmp_path):
    # 10 users x 10 events at times 0..99 spread so the cut is global, not per user
    df = events([(u, (u * 10 + t) % 37 + 1, u * 10 + t, 5) for u in range(10) for t in range(10)])
    prepare(raw_of(df), tmp_path / "d", source="t", params={}, filters=FilterConfig(min_seq_len=1), split="temporal")
    d = open_prepared(tmp_path / "d")
    valid, test = d.table("valid"), d.table("test")
    # the 80th/90th percentiles of times 0..99 fall at 79.2/89.1: times 80..89 (all of the
    # 9th user) are valid, 90..99 (the 10th user) test. A user's first event has no
    # history to predict from, so each split holds 9 rows.
    assert set(valid["user_idx"]) == {9} and set(test["user_idx"]) == {10}
    assert len(valid) == 9 and len(test) == 9
    assert [len(h) for h in test["history"]] == list(range(1, 10))
    assert len(d.table("train")) == 8


def test_user_prefix_split_80_90_100(tmp_path):
    prepare(raw_of(ladder(users=2, length=10)), tmp_path / "d", source="t", params={},
            filters=FilterConfig(), split="user_prefix")
    d = open_prepared(tmp_path / "d")
    assert [len(s) for s in d.table("train")["seq"]] == [8, 8]
    valid, test = d.table("valid"), d.table("test")
    assert len(valid) == 2 and len(test) == 2
    assert [len(h) for h in valid["history"]] == [8, 8] and [len(h) for h in test["history"]] == [9, 9]


def test_item_metadata_joined_and_defaults(tmp_path):
    items = pd.DataFrame({"item": ["1", "2"], "title": ["One", "Two"], "text": ["first", None]})
    prepare(raw_of(ladder(users=2), items), tmp_path / "d", source="t", params={}, filters=FilterConfig(), split="leave_one_out")
    it = open_prepared(tmp_path / "d").table("items").set_index("source_id")
    assert it.loc["1", "title"] == "One" and it.loc["2", "text"] == ""
    assert it.loc["5", "title"] == "item 5"  # no metadata: a readable default


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    def boom(workdir: Path):
        (workdir / "partial.txt").write_text("x")
        raise DataError("reader failed")

    with pytest.raises(DataError):
        prepare(boom, tmp_path / "d", source="t", params={}, filters=FilterConfig(), split="leave_one_out")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path):
    args = dict(source="t", params={}, filters=FilterConfig(), split="leave_one_out")
    prepare(raw_of(ladder()), tmp_path / "d", **args)
    with pytest.raises(DataError, match="--overwrite"):
        prepare(raw_of(ladder()), tmp_path / "d", **args)
    prepare(raw_of(ladder(users=5)), tmp_path / "d", overwrite=True, **args)
    assert open_prepared(tmp_path / "d").manifest["counts"]["users"] == 5


def test_describe_statistics(tmp_path):
    prepare(raw_of(ladder()), tmp_path / "d", source="t", params={}, filters=FilterConfig(), split="leave_one_out")
    info = describe(open_prepared(tmp_path / "d"))
    assert info["users"] == 4 and info["items"] == 8
    assert info["sparsity"] == pytest.approx(1 - 20 / 32)
    assert info["train_seq_len"]["p50"] == 3


def test_open_prepared_explains_missing_files(tmp_path):
    with pytest.raises(DataError, match="no prepared dataset"):
        open_prepared(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "items.parquet").write_text("")
    with pytest.raises(DataError, match="missing train.parquet"):
        open_prepared(tmp_path / "half")


def test_a_synthetic_dataset_made_with_other_settings_is_used_with_a_warning(tmp_path, caplog):
    from rayrec.config.schema import DataConfig
    from rayrec.data.dataset import ensure_prepared

    synth = {"users": 30, "items": 40, "topics": 4, "mean_len": 10, "images": False}
    cfg = DataConfig(path=tmp_path / "d", synth=synth)
    ds = ensure_prepared(cfg)
    assert ensure_prepared(cfg).path == ds.path  # same settings: opened as is
    # a manifest from before the styles/new_items knobs existed counts them as their defaults
    manifest = json.loads((ds.path / "manifest.json").read_text())
    for key in ("styles", "new_items", "new_window"):
        manifest["params"]["synth"].pop(key)
    (ds.path / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level("WARNING", logger="rayrec.data.dataset"):
        ensure_prepared(cfg)
        assert not caplog.records
        other = ensure_prepared(DataConfig(path=tmp_path / "d", synth={**synth, "new_items": 0.2}))
    assert other.manifest["counts"] == ds.manifest["counts"]  # the folder as it is, not regenerated
    assert len(caplog.records) == 1
    msg = caplog.records[0].getMessage()
    assert str(ds.path) in msg and "new_items: 0.0 there, 0.2 in the job" in msg and "Delete it" in msg
